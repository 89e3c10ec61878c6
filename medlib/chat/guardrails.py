"""Guardrails around the chat model: red-flag detection, the disclaimer and input clean-up.

The regular expressions here are the floor of red-flag detection: medlib.chat.red_flags runs them
and a classifier by meaning on every message, and either one flags it. They match the user's
words clause by clause, and a match is ignored when a negation governs it in the same clause ("no
chest pain", "I am not suicidal", "denies shortness of breath").
"""

from __future__ import annotations

import re
from dataclasses import dataclass

URGENT_MESSAGE = "This may be a medical emergency. Do not wait for an online answer."
_CALL = "call an ambulance now (for example 911, 112 or 999)"
# One short, specific action per category (medlib.chat.red_flags.CATEGORIES).
URGENT_ACTIONS = {
    "cardiac": f"Chest pain like this needs help fast: {_CALL}. Do not drive yourself; sit down and rest while you wait.",
    "stroke": f"These can be signs of a stroke: {_CALL} and note the time the symptoms started. Do not drive yourself.",
    "suicide_self_harm": (
        "Please reach out now: call or text a crisis line (988 in the US; Samaritans 116 123 in the UK and Ireland) "
        "or your local emergency number. If you are in danger right now, call emergency services. "
        "You do not have to face this alone."),
    "overdose_poisoning": (
        "Call poison control now (1-800-222-1222 in the US) or your emergency number, even if they seem well. "
        "Do not make them vomit; keep the packet or bottle."),
    "anaphylaxis": f"This may be a severe allergic reaction: use an adrenaline auto-injector (EpiPen) if there is one and {_CALL}.",
    "severe_bleeding": f"Heavy bleeding needs emergency care: {_CALL}. For a wound, press hard on it with a clean cloth and keep pressing.",
    "breathing_collapse": f"{_CALL[0].upper() + _CALL[1:]}. If the person is not breathing normally, start CPR; the call handler will guide you.",
    "thunderclap_headache": f"A sudden, severe headache needs emergency care: {_CALL}. Do not drive yourself.",
    "seizure": (f"For a first seizure, one over 5 minutes, or someone who does not wake up: {_CALL}. "
                "Lay them on their side and put nothing in their mouth."),
    "child_danger": f"A child with these signs needs urgent care: {_CALL} or go to the emergency department. Do not wait to see if it passes.",
    "diabetic_emergency": (f"Very high or very low blood sugar with these signs is an emergency: {_CALL}. If they are awake and "
                           "can swallow and the sugar is low, give sugar now; never give food or drink to someone drowsy."),
}
_NOW = "call 999 / 112 / your local emergency number now"
# The safety-net tier: the model answers, and this one line follows (the category is the emergency the message
# is about, though it is not happening now).
SAFETY_NETS = {
    "cardiac": f"If chest pain comes on and lasts more than a few minutes, or spreads to the arm, jaw or back, {_NOW}.",
    "stroke": f"If a face droops, an arm goes weak or speech slurs, even for a moment, {_NOW} and note the time.",
    "suicide_self_harm": ("If you or someone else is thinking about suicide or self-harm, call or text a crisis line "
                          "(988 in the US; Samaritans 116 123 in the UK and Ireland) or your local emergency number now."),
    "overdose_poisoning": f"If someone has taken too much of a medicine or swallowed something harmful, {_NOW} or poison control, even if they seem well.",
    "anaphylaxis": f"If lips, tongue or throat swell or breathing gets hard after an allergen, use an adrenaline auto-injector and {_NOW}.",
    "severe_bleeding": f"If bleeding is heavy or will not stop with firm pressure, or you vomit or cough up blood, {_NOW}.",
    "breathing_collapse": f"If someone collapses, cannot be woken or is not breathing normally, {_NOW} and start CPR.",
    "thunderclap_headache": f"If a sudden, severe headache peaks within a minute or comes with a stiff neck or confusion, {_NOW}.",
    "seizure": f"If a seizure lasts more than 5 minutes, repeats, or is someone's first, {_NOW}.",
    "child_danger": (f"If a baby under 3 months has a temperature of 38 C or more, or a child is floppy, hard to wake, "
                     f"breathing hard or has a rash that does not fade under a glass, {_NOW}."),
    "diabetic_emergency": f"If blood sugar is very high with vomiting or fast breathing, or low with confusion or drowsiness, {_NOW}.",
}
ENGLISH_ONLY_REPLY = ("I can only help in English. Please write your question in English. "
                      "(Solo puedo ayudar en inglés. Je ne peux aider qu'en anglais. Ich kann nur auf Englisch helfen. "
                      "Só posso ajudar em inglês.)")
SUPPORT_REPLY = (
    "I'm sorry you are going through a hard time. Talking to someone can help: your doctor, someone you trust, "
    "or a support line (988 in the US; Samaritans 116 123 in the UK and Ireland), any time of day. "
    "If you ever think about harming yourself, call your local emergency number."
)
DOSE_CAUTION = ("Caution: this answer mentions a dose or a medicine regimen. Check any dose with a pharmacist or "
                "clinician before taking it; this assistant can be wrong.")
DISCLAIMER = (
    "Note: I am an AI assistant, not a doctor. This is general information, not a diagnosis or treatment; "
    "please see a qualified clinician about your own health."
)
GREETING_REPLY = (
    "Hello! I am a medical assistant. Describe your symptoms or ask a question about a health condition, "
    "a medicine or a test, and I will do my best to help."
)
FALLBACK_REPLY = (
    "I can only help with health and medical questions: symptoms, illnesses, medicines and their side effects, "
    "tests and results, and when to see a doctor. Please ask me something like that (I work best in English)."
)
EMPTY_REPLY = "Your message was empty. Please type a health question or describe your symptoms."

# Words that negate a symptom named later in the same clause.
_NEGATOR = (
    r"\b(?:no|not|never|without|denies|denied|deny|negative\s+for|free\s+of|nor|"
    r"(?:do|does|did|have|has|had|am|is|are|was|were|ca|can|could|would|wo)n[o']?t|cannot|"
    r"haven't|hasn't|isn't|aren't|wasn't|weren't|don't|doesn't|didn't|no\s+longer|ruled\s+out|"
    # the negators of the other languages' patterns below ("não quero morrer", "je n'ai pas pris tous mes cachets")
    r"não|nao|nunca|jamás|jamais|ne|n'|pas|ni|nem|sin|sans|sem|ohne|nicht|nie|niemals|kein|keine|keinen)\b"
)
_NEGATION_WINDOW = 6  # words before the symptom in which a negator counts
_CLAUSE_SPLIT = re.compile(r"[.;!?\n]+|,\s*(?:but|and|though|although|however)\b|\b(?:but|however|although|though)\b")


def _rx(*alternatives: str) -> re.Pattern[str]:
    return re.compile(r"\b(?:" + "|".join(alternatives) + r")", re.IGNORECASE)


_CHEST = _rx(r"chest\s+(?:pain|pains|pressure|tightness|discomfort|is\s+(?:hurting|tight))", r"pain\s+in\s+(?:my|the)\s+chest",
             r"(?:tight|crushing|heavy|painful)\s+chest", r"chest\s+(?:feels|is|felt)\s+(?:\w+\s+){0,2}(?:tight|heavy|crushed|painful)", r"heart\s+attack")
_BREATH = _rx(r"short(?:ness)?\s+of\s+breath", r"breathless", r"can(?:no|')?t\s+breathe", r"cannot\s+breathe",
              r"(?:difficulty|trouble|struggling|hard)\s+(?:to\s+)?breath", r"out\s+of\s+breath", r"gasping",
              r"unable\s+to\s+breathe", r"(?:pain|spreading|radiating)\s+(?:\w+\s+){0,3}(?:to|down|into)\s+(?:my\s+)?(?:left\s+)?(?:arm|jaw)",
              r"cold\s+sweat")

# Suicide, self-harm and overdose stated in Spanish, French, German or Portuguese: the classifier reads these
# languages through an English encoder, and its recall on them is the weakest (issue 27), so the floor names, in each,
# how someone says they will kill themselves, want to die, hurt themselves, or have taken a whole supply.
_MANY = r"(?:como\s+|unos?\s+|unas\s+|uns\s+|umas\s+|más\s+de\s+|mais\s+de\s+|ungefähr\s+|etwa\s+|über\s+)?[1-9]\d+\b(?!\s*(?:mg|ml|g\b|mcg|µg|gotas|gouttes|tropfen|min|h\b))"
_SUICIDE_OTHER_LANGUAGES = _rx(
    # es: intent, plan or goodbye, first or third person
    r"(?:me|se)\s+(?:voy|va|vas|quiero|quiere)\s+a?\s*(?:matar|suicidar|morir|quitar\s+la\s+vida|tirar\s+(?:desde|por|del|de\s+la))",
    r"(?:voy|va|quiero|quiere|pienso|piensa)\s+a?\s*(?:matarme|matarse|suicidarme|suicidarse|quitarme\s+la\s+vida|morirme|saltar)",
    r"quitar(?:me|se)\s+la\s+vida", r"(?:acabar|terminar)\s+con\s+(?:mi|su)\s+vida", r"acabar\s+con\s+todo",
    r"quiero\s+morir", r"no\s+quiero\s+(?:seguir\s+)?vivir", r"(?:estaría|estaria|estarían|estarian)\s+mejor\s+muert[oa]s?",
    r"suicid(?:arme|arse|io|a)\b", r"autolesi", r"carta(?:s)?\s+de\s+despedida", r"despidiéndose",
    r"cortarme\s+(?:las\s+venas|los\s+brazos|las\s+muñecas)", r"me\s+he\s+hecho\s+cortes",
    # fr
    r"(?:me|se)\s+(?:tuer|suicider)", r"mettre\s+fin\s+à\s+(?:mes|ses)\s+jours", r"mettre\s+fin\s+à\s+(?:ma|sa)\s+vie",
    r"(?:vais|va)\s+en\s+finir", r"en\s+finir\s+avec\s+(?:la|ma|sa)\s+vie", r"(?:veux|voudrais|envie\s+de)\s+mourir",
    r"me\s+(?:faire\s+du\s+mal|scarifier|mutiler|taillader)", r"taillad\w+\s+les\s+poignets", r"plus\s+envie\s+de\s+vivre",
    r"(?:lettre|message|mot)\s+d'adieu", r"(?:vais|va)\s+sauter", r"suicid(?:er|aire)",
    # de
    r"mich\s+(?:umbringen|töten|toeten|umzubringen)", r"sich\s+(?:umbringen|umzubringen|töten)", r"bringt?\s+(?:mich|sich)\s+um\b",
    r"sich\s+umbringt", r"(?:mir|mein|sich|sein|ihr)\s+(?:das\s+)?leben\s+(?:zu\s+)?(?:nehmen|beenden)",
    r"(?:will|möchte|moechte)\s+(?:nur\s+noch\s+)?sterben", r"nicht\s+mehr\s+leben\s+(?:will|möchte)", r"will\s+nicht\s+mehr\s+leben",
    r"(?:mich|mir)\s+(?:selbst\s+)?(?:ritzen|verletzen)", r"ritze\s+mich", r"suizid", r"selbstmord", r"abschiedsbrief",
    r"abschiedsnachricht", r"(?:springt|springe|springen|stürzt|stürze)\s+(?:\w+\s+){0,2}(?:aus\s+dem\s+fenster|von\s+der\s+brücke|vom\s+dach)",
    # pt
    r"(?:me|se)\s+matar", r"(?:vou|vai|quero|quer)\s+(?:me\s+|se\s+)?suicidar", r"(?:vou|vai)\s+(?:me|se)\s+jogar",
    r"tirar\s+(?:a\s+)?(?:minha|sua)\s+(?:própria\s+)?vida", r"acabar\s+com\s+(?:a\s+)?(?:minha|sua)\s+vida", r"quero\s+morrer",
    r"não\s+quero\s+mais\s+viver", r"me\s+(?:cortar|machucar)\s+de\s+propósito", r"automutila", r"suicíd",
    r"carta\s+de\s+despedida", r"se\s+despedindo")
_OVERDOSE_OTHER_LANGUAGES = _rx(
    # es: a whole supply, or a number of tablets, taken; something toxic drunk or swallowed
    r"(?:tomé|tomó|tomado|tragué|tragó|tragado|tomo)\s+(?:\w+\s+){0,2}(?:todas|todos|toda|una\s+caja|un\s+bote|el\s+bote|la\s+caja)\s*"
    r"(?:\w+\s+){0,2}(?:pastillas|comprimidos|medicamentos|medicinas|caja|bote|pastillero)",
    r"caja\s+entera", r"(?:tomé|tomó|tomado|tragué|tragó|tragado)\s+" + _MANY,
    r"sobredosis", r"(?:bebió|bebí|bebido|tomó|tragó|tragado|tragué)\s+(?:\w+\s+){0,2}(?:lejía|lejia|veneno|matarratas|anticongelante|aguarrás|una\s+pila|pila\s+de\s+botón)",
    r"monóxido\s+de\s+carbono",
    # fr
    r"(?:pris|avalé|avalée|avale)\s+(?:\w+\s+){0,2}(?:tous|toutes|toute\s+la\s+boîte|une\s+boîte|la\s+boîte|la\s+plaquette)\s*"
    r"(?:\w+\s+){0,2}(?:médicaments|medicaments|cachets|comprimés|comprimes|pilules|boîte|plaquette)?",
    r"(?:j'en\s+ai\s+pris|(?:ai|a)\s+pris|avalé)\s+" + _MANY, r"surdose",
    r"(?:bu|avalé|avalée)\s+(?:\w+\s+){0,2}(?:javel|poison|antigel|mort-aux-rats|insecticide|une\s+pile|pile\s+bouton)",
    r"monoxyde\s+de\s+carbone",
    # de
    r"(?:alle|ganzen)\s+(?:meine\s+|seine\s+|ihre\s+|die\s+)?(?:\w+\s+)?(?:tabletten|pillen|medikamente|schlaftabletten)",
    r"(?:packung|schachtel|flasche)\s+(?:\w+\s+){0,2}(?:genommen|geschluckt)", r"überdosis", r"ueberdosis",
    _MANY + r"\s+(?:\w+\s+){0,1}(?:genommen|geschluckt)",
    r"(?:bleiche|gift|frostschutz\w*|rattengift|batterie|knopfzelle|knopfbatterie)\s+(?:\w+\s+){0,2}(?:getrunken|geschluckt|verschluckt|gegessen)",
    r"kohlenmonoxid",
    # pt
    r"(?:tomei|tomou|engoli|engoliu)\s+(?:\w+\s+){0,2}(?:todos|todas|uma\s+caixa|a\s+caixa|a\s+cartela|uma\s+cartela)\s*"
    r"(?:\w+\s+){0,2}(?:remédios|remedios|comprimidos|pílulas|pilulas|caixa|cartela)?", r"cartela\s+inteira",
    r"(?:tomei|tomou|engoli|engoliu)\s+" + _MANY, r"sobredose",
    r"(?:bebeu|bebi|engoliu|engoli)\s+(?:\w+\s+){0,2}(?:água\s+sanitária|lixívia|veneno|chumbinho|anticongelante|soda\s+cáustica|uma\s+pilha|bateria)",
    r"monóxido\s+de\s+carbono")

_ENGLISH_FLOOR: dict[str, list[tuple[re.Pattern[str], ...]]] = {
    # each entry: a tuple of patterns that must ALL match (un-negated) somewhere in the message
    "cardiac": [(_CHEST, _BREATH), (_rx(r"(?:having|have)\s+a\s+heart\s+attack"),)],
    "stroke": [(_rx(
        r"(?:face|mouth|smile)\s+(?:is\s+)?(?:drooping|droops|droopy|has\s+dropped|is\s+dropping)",
        r"droop\w*\s+(?:on\s+)?(?:one\s+side|face|mouth)", r"slurr(?:ed|ing)\s+(?:speech|words|my\s+words)",
        r"(?:speech|talking)\s+is\s+slurred", r"can(?:no|')?t\s+(?:speak|talk|lift\s+(?:my|his|her)\s+arm)",
        r"(?:sudden|suddenly)\s+(?:[\w']+\s+){0,4}(?:weak|numb|paralys|confus|lost\s+(?:vision|sight)|can'?t\s+(?:see|feel|move))",
        r"face\s+(?:feels|is|went|has\s+gone)\s+numb",
        r"(?:weak|weakness|numb|numbness)\s+(?:\w+\s+){0,3}(?:one\s+side|left\s+side|right\s+side)",
        r"(?:one|left|right)\s+side\s+of\s+(?:my|his|her|the)\s+(?:face|body)\s+(?:is\s+)?(?:numb|weak|drooping|paraly)",
        r"(?:having|think\s+(?:i|he|she)\s+(?:am|is|'m)\s+having)\s+a\s+stroke"),)],
    "suicide_self_harm": [(_rx(
        r"suicid", r"kill(?:ing)?\s+(?:my|him|her)sel(?:f|ves)", r"end(?:ing)?\s+(?:my|his|her)\s+(?:own\s+)?life", r"end(?:ing)?\s+it\s+all",
        r"take\s+my\s+(?:own\s+)?life", r"want\s+to\s+die", r"wish\s+i\s+(?:was|were)\s+dead",
        r"(?:hurt(?:ing)?|harm(?:ing)?|cut(?:ting)?)\s+myself", r"self[-\s]?harm", r"better\s+off\s+dead", r"no\s+reason\s+to\s+live",
        # goodbye notes, a risk sign without a symptom word (the classifier must agree: FLOOR_MIN)
        r"(?:my|this\s+is\s+my)\s+(?:very\s+)?last\s+(?:message|goodbye|words|note|post)", r"goodbye\s+(?:forever|for\s+good)",
        r"won'?t\s+be\s+(?:around|here|alive)\s+(?:after\s+tonight|much\s+longer|anymore|any\s+more)"),)],
    "overdose_poisoning": [(_rx(
        r"overdos", r"od'?d\b", r"took\s+(?:too\s+many|(?:a|the|my)\s+(?:whole|full|entire)\s+(?:bottle|box|pack|packet|strip)|all\s+(?:my|the|of\s+my))\s*(?:\w+\s+){0,2}(?:pills|tablets|medicine|meds|pack|bottle)?",
        r"(?:swallowed|drank|ate|drunk|ingested)\s+(?:\w+\s+){0,3}(?:bleach|poison|antifreeze|detergent|pesticide|rat\s+poison|weed\s*killer|batter(?:y|ies)|cleaning\s+(?:fluid|product))",
        r"(?<!food )poison(?:ed|ing)", r"carbon\s+monoxide"),)],
    "anaphylaxis": [(_rx(
        r"anaphyla", r"throat\s+(?:is\s+)?(?:closing|swelling|swollen|tight)", r"(?:tongue|lips?|face)\s+(?:is\s+|are\s+)?(?:swelling|swollen|swell)\w*\s+(?:\w+\s+){0,4}(?:after|from|since)",
        r"swollen\s+(?:tongue|lips|throat)", r"epi[-\s]?pen"),),
                    (_BREATH, _rx(r"bee\b", r"wasp", r"sting", r"peanut", r"nuts?\b", r"shellfish", r"allerg"))],
    "severe_bleeding": [(_rx(
        r"bleeding\s+(?:\w+\s+){0,2}(?:heavily|a\s+lot|badly|profusely|non[-\s]?stop|everywhere)", r"heavy\s+bleeding",
        r"(?:won'?t|will\s+not|doesn'?t|does\s+not|can'?t|cannot)\s+stop\s+(?:the\s+)?bleeding",
        r"bleeding\s+(?:won'?t|will\s+not|doesn'?t|does\s+not)\s+stop", r"blood\s+(?:is\s+)?(?:spurting|pouring|gushing)",
        r"(?:vomiting|throwing\s+up)\s+blood", r"coughing\s+up\s+(?:a\s+lot\s+of|lots\s+of)\s+blood", r"soak(?:ing|ed)\s+(?:through\s+)?(?:a\s+)?(?:pad|pads|tampon)",
        r"lost\s+a\s+lot\s+of\s+blood"),)],
    "child_danger": [(_rx(r"bab(?:y|ies)\b", r"infant\b", r"newborn\b", r"toddler\b", r"child(?:ren)?\b", r"kids?\b", r"son\b", r"daughter\b", r"\d+[-\s](?:month|week|day)[-\s]old"),
                            _rx(r"not\s+breathing", r"stopped\s+breathing", r"struggling\s+to\s+breathe", r"blue\s+(?:lips|face|skin)",
                                r"(?:lips|face|skin)\s+(?:is\s+|are\s+|turning\s+|turned\s+)?blue", r"(?:is|gone|went|very|floppy\s+and)\s+limp\b", r"floppy",
                                r"unresponsive", r"won'?t\s+wake", r"(?:can'?t|cannot)\s+(?:be\s+)?wake", r"hard\s+to\s+wake",
                                r"seizure", r"having\s+(?:a\s+)?fits?\b", r"fitting\b", r"convuls", r"stiff\s+neck", r"rash\s+(?:that\s+)?(?:does\s*n[o']?t|won'?t)\s+fade",
                                r"not\s+(?:feeding|drinking|eating)\s+(?:at\s+all|for)", r"no\s+wet\s+nappies", r"no\s+wet\s+diapers",
                                r"fever\s+(?:of\s+)?(?:over\s+|above\s+)?(?:3[89]|40|10[2-5])", r"high\s+fever\s+(?:\w+\s+){0,4}(?:under|months?)")),
                           ],
    "breathing_collapse": [(_rx(r"(?:collapsed|passed\s+out|fainted)\s+and\s+(?:is\s+)?(?:not|isn'?t|won'?t|can'?t)",
                                r"unresponsive", r"not\s+responding", r"(?:isn'?t|is\s+not|stopped)\s+breathing",
                                r"(?:lips|face|fingers)\s+(?:are\s+|is\s+)?(?:going|turning|gone|turned)\s+blue"),)],
    "thunderclap_headache": [(_rx(r"worst\s+headache\s+(?:of\s+my\s+life|ever|i'?ve\s+ever)", r"thunderclap"),)],
    "seizure": [(_rx(r"(?:having|had)\s+a\s+(?:seizure|fit)\s+(?:right\s+)?now", r"(?:is|are|keeps?)\s+(?:seizing|convulsing|fitting)",
                     r"convulsing", r"seizure\s+(?:won'?t|will\s+not|that\s+won'?t)\s+stop"),)],
}
# The other categories in Spanish, French, German and Portuguese: what is happening now, said plainly (a face drooping
# on one side, "no respira", blood spurting, the worst headache of a life), never a topic word alone.
_CHEST_OTHER_LANGUAGES = _rx(
    r"(?:dolor|opresi[oó]n|presi[oó]n)\s+(?:\w+\s+){0,3}(?:en\s+el\s+)?pecho", r"(?:me|le)\s+duele\s+(?:\w+\s+){0,2}el\s+pecho",
    r"agarr[aá]ndose\s+el\s+pecho", r"(?:mal|douleur)\s+(?:\w+\s+){0,3}(?:à\s+la|dans\s+la)\s+poitrine", r"douleur\s+thoracique",
    r"mal\s+au\s+thorax", r"se\s+tient\s+la\s+poitrine", r"(?:serre|écrase)\s+(?:\w+\s+){0,3}(?:dans\s+la\s+)?poitrine",
    r"brustschmerz", r"schmerz\w*\s+in\s+der\s+brust", r"(?:drückt|engegefühl|enge)\s+(?:\w+\s+){0,3}(?:in\s+der\s+)?brust",
    r"dor\s+(?:\w+\s+){0,3}(?:no|do)\s+peito", r"peito\s+dói", r"aperto\s+(?:\w+\s+){0,3}(?:no\s+)?peito", r"mão\s+no\s+peito")
_CHEST_WITH_OTHER_LANGUAGES = _rx(
    r"brazo\s+izq", r"mand[ií]bula", r"sud(?:ando|or)", r"empapad[oa]\s+en\s+sudor", r"no\s+puedo\s+respirar", r"me\s+falta\s+el\s+aire",
    r"desmay", r"bras\s+gauche", r"m[aâ]choire", r"sueurs?\s+froides?", r"manque\s+d'air", r"j'étouffe", r"n'arrive\s+plus\s+à\s+respirer",
    r"tomber\s+dans\s+les\s+pommes", r"link(?:en|er)\s+arm", r"kiefer", r"kalt(?:en|er)?\s+schwei", r"kaltschwei", r"keine\s+luft",
    r"atemnot", r"braço\s+esquerdo", r"pescoço", r"suando\s+frio", r"suor\s+frio", r"falta\s+de\s+ar", r"faltando\s+ar",
    r"não\s+consigo\s+respirar", r"sem\s+ar\b")
_OTHER_LANGUAGE_FLOOR: dict[str, list[tuple[re.Pattern[str], ...]]] = {
    "cardiac": [(_CHEST_OTHER_LANGUAGES, _CHEST_WITH_OTHER_LANGUAGES), (_rx(
        r"(?:me|le)\s+est[aá]\s+dando\s+un\s+infarto", r"(?:je\s+fais|il\s+fait|elle\s+fait)\s+un\s+infarctus",
        r"(?:hab\s+ich|habe\s+ich|ich\s+habe|er\s+hat|sie\s+hat)\s+(?:einen|nen)\s+herzinfarkt", r"(?:estou|está|tô|tá)\s+tendo\s+um\s+infarto"),)],
    "stroke": [(_rx(
        r"(?:cara|boca)\s+(?:\w+\s+){0,2}(?:torcida|desviada|chueca|ca[ií]da)", r"se\s+le\s+cae\s+la\s+cara", r"sonr[ií]e\s+de\s+un\s+lado",
        r"no\s+puede\s+(?:levantar|mover|sostener)\s+(?:el|la)\s+(?:brazo|mano|vaso)", r"no\s+puedo\s+mover\s+(?:la|el)\s+(?:mano|brazo|pierna)",
        r"no\s+se\s+le\s+entiende", r"no\s+encuentra\s+las\s+palabras", r"arrastra\s+la\s+pierna", r"le\s+est[aá]\s+dando\s+un\s+ictus",
        r"(?:bouche|visage)\s+(?:\w+\s+){0,3}(?:tordue|de\s+travers|qui\s+tombe|tombe)", r"ne\s+trouve\s+plus\s+ses\s+mots",
        r"n'arrive\s+plus\s+à\s+(?:lever|bouger)", r"seul\s+un\s+côté\s+bouge", r"fait\s+un\s+avc",
        r"schiefes\s+gesicht", r"lächelt\s+schief", r"mundwinkel\s+(?:\w+\s+){0,2}hängt", r"hängt\s+(?:\w+\s+){0,4}(?:gesicht|mundwinkel)",
        r"arm\s+nicht\s+mehr\s+heben", r"redet\s+(?:\w+\s+){0,2}verwaschen", r"seite\s+ist\s+taub", r"(?:hat|hatte)\s+(?:einen|nen)\s+schlaganfall",
        r"(?:cara|boca|sorriso)\s+(?:\w+\s+){0,2}tort[oa]", r"rosto\s+caiu", r"não\s+consegue\s+levantar\s+o\s+braço",
        r"não\s+consigo\s+mexer\s+(?:a|o)\s+(?:mão|braço|perna)", r"fal(?:a|ando|ar)\s+(?:tudo\s+)?(?:enrolado|embolado)", r"(?:tendo|teve)\s+um\s+avc"),)],
    "thunderclap_headache": [(_rx(
        r"peor\s+dolor\s+de\s+cabeza", r"dolor\s+de\s+cabeza\s+(?:\w+\s+){0,1}(?:súbito|subito|brutal|repentino)", r"estallido\s+en\s+la\s+cabeza",
        r"pire\s+(?:mal\s+de\s+(?:tête|tete|crâne|crane)\s+)?de\s+ma\s+vie", r"explosion\s+dans\s+la\s+tête", r"mal\s+de\s+tête\s+brutal",
        r"schlimmste\w*\s+kopfschmerz", r"knall\s+im\s+kopf", r"donnerschlag", r"kopfschmerz\w*\s+wie\s+ein\s+hammerschlag",
        r"pior\s+dor\s+de\s+cabeça", r"explosão\s+na\s+cabeça", r"dor\s+de\s+cabeça\s+súbita"),)],
    "seizure": [(_rx(
        r"convulsion(?:ando|a)\b", r"convulsiones\s+una\s+detr[aá]s\s+de\s+otra", r"crisis\s+seguidas", r"sacudidas\s+por\s+todo\s+el\s+cuerpo",
        r"ojos\s+en\s+blanco", r"(?:fait|a\s+fait)\s+(?:une|trois|deux)\s+crises?\s+(?:d'affilée|d'épilepsie)", r"crise\s+d'épilepsie\s+qui",
        r"crise\s+dure\s+depuis", r"tremble\s+de\s+tout\s+le\s+corps", r"vient\s+de\s+convulser|convulse\b",
        r"krampft", r"epileptischen\s+anfall", r"zuckt\s+(?:\w+\s+){0,2}(?:am\s+ganzen\s+körper|mit\s+armen\s+und\s+beinen)",
        r"anfall\s+hört\s+nicht\s+auf", r"anfall\s+nach\s+dem\s+anderen", r"tendo\s+uma\s+convulsão", r"convulsão\s+atrás\s+da\s+outra",
        r"se\s+debatendo", r"crises\s+seguidas", r"olhos\s+revirados"),)],
    "severe_bleeding": [(_rx(
        r"sangr(?:a|ando)\s+(?:\w+\s+){0,2}(?:much[ií]simo|sin\s+parar|a\s+chorros)", r"sangre\s+(?:\w+\s+){0,2}(?:a\s+chorros|a\s+borbotones)",
        r"vomitando\s+sangre", r"no\s+para\s+de\s+sangrar", r"saigne\s+(?:\w+\s+){0,2}(?:énormément|sans\s+arrêt|abondamment)",
        r"pisse\s+le\s+sang", r"vomi(?:s|t)\s+du\s+sang", r"le\s+sang\s+gicle", r"blute\w*\s+(?:\w+\s+){0,2}(?:sehr\s+stark|extrem\s+stark)",
        r"spritzt\s+(?:das\s+)?blut", r"blut\s+spritzt", r"erbricht\s+blut", r"voller\s+blut", r"hört\s+nicht\s+auf\s+zu\s+bluten",
        r"sangr(?:ando|a)\s+(?:\w+\s+){0,2}(?:sem\s+parar|imenso)", r"sangue\s+(?:\w+\s+){0,3}(?:jorrar|jorra|a\s+jorrar)",
        r"vomitando\s+sangue", r"não\s+para\s+de\s+sangrar"),)],
    "breathing_collapse": [(_rx(
        r"no\s+respira\b(?!\s+(?:bien|por|con|mal))", r"dej[oó]\s+de\s+respirar", r"no\s+(?:responde|reacciona)\b(?!\s+(?:a|al|bien)\b)", r"est[aá]\s+inconsciente",
        r"se\s+est[aá]\s+poniendo\s+morad", r"atragant\w+\s+(?:\w+\s+){0,6}no\s+puede\s+(?:toser|hablar|respirar)",
        r"ne\s+respire\s+(?:plus|pas)\b(?!\s+(?:bien|par|très|avec))", r"ne\s+réagit\s+(?:plus|pas)", r"lèvres\s+bleues", r"devient\s+(?:bleu|violet)", r"s'étouffe",
        r"atmet\s+nicht", r"reagiert\s+nicht(?:\s+mehr)?\b", r"ist\s+bewusstlos", r"blaue\s+lippen", r"läuft\s+blau\s+an",
        r"ich\s+krieg\s+keine\s+luft", r"não\s+(?:está\s+)?respira(?:ndo)?\b(?!\s+(?:bem|direito|pelo|pela|com))", r"parou\s+de\s+respirar", r"não\s+reage\b",
        r"lábios\s+(?:roxos|azulados|azuis)", r"ficar\s+roxo|ficando\s+roxo", r"engasg\w+\s+(?:\w+\s+){0,6}não\s+consegue\s+(?:falar|tossir|respirar)"),)],
    "anaphylaxis": [(_rx(
        r"se\s+(?:me|le)\s+cierra\s+la\s+garganta", r"lengua\s+hinchada", r"anafil[aá]ctic", r"gorge\s+(?:qui\s+)?se\s+serre",
        r"(?:langue|gorge)\s+(?:\w+\s+){0,1}gonfl", r"hals\s+(?:\w+\s+){0,2}(?:wird\s+)?eng\b", r"zunge\s+(?:\w+\s+){0,2}geschwollen",
        r"allergische\w*\s+(?:schock|reaktion)", r"garganta\s+(?:\w+\s+){0,2}fechando", r"língua\s+inchada"),)],
    "suicide_self_harm": [(_SUICIDE_OTHER_LANGUAGES,)],
    "overdose_poisoning": [(_OVERDOSE_OTHER_LANGUAGES,)],
}
# Each category's alternatives: English first, then the other languages'.
RED_FLAG_PATTERNS: dict[str, list[tuple[re.Pattern[str], ...]]] = {
    category: alternatives + _OTHER_LANGUAGE_FLOOR.get(category, []) for category, alternatives in _ENGLISH_FLOOR.items()}
assert set(_OTHER_LANGUAGE_FLOOR) <= set(_ENGLISH_FLOOR), "a category with patterns in other languages only"


@dataclass
class RedFlag:
    category: str
    evidence: list[str]


# A baby under 3 months with a temperature of 38 C or more (NICE NG143: red, whatever else), or under 35.5 C (WHO IMCI:
# a young infant's danger sign), stated as numbers: an age ("5 weeks old", "baby is 3 weeks", "tiene 2 semanas")
# and a temperature (with a decimal, a unit, or after "temp", "fever", "measured", ...). Written on the training
# set's fit part (53 of its child emergencies, none of its other messages), then tried on the tuning quarter.
_NUMBER_WORDS = {w: i for i, w in enumerate("zero one two three four five six seven eight nine ten eleven twelve".split())}
_AGE_NUMBER = r"(\d{1,3}|" + "|".join(_NUMBER_WORDS) + r"|a)"
_AGE_UNIT = r"(days?|d|weeks?|wks?|w|months?|mos?)"
_INFANT_AGE = re.compile(
    rf"\b{_AGE_NUMBER}\s*-?\s*{_AGE_UNIT}\s*-?\s*old\b"
    rf"|\b(?:bab(?:y|ies)|son|daughter|infant|newborn|twins|he|she|lo|little\s+one|(?:she|he|it)'s|age)\s*[,:]?\s+"
    rf"(?:is\s+|are\s+|was\s+born\s+|of\s+)?(?:only\s+|just\s+)?{_AGE_NUMBER}\s*{_AGE_UNIT}\b(?!\s+(?:ago|now|later))"
    r"|\b(?:tiene|tem|a|ist|de|com|mit)\s+(\d{1,2})\s*(semanas?|semaines?|wochen|tagen?|d[ií]as|jours|meses|mois|monate?n?)\b"
    r"(?!\s+(?:que|depuis|seit|ago))"
    r"|\b(\d{1,2})\s*(wo|mo)\b|\b(newborn|neonate|new-born)\b", re.IGNORECASE)
_TEMPERATURE = re.compile(r"(?<![\d.,])(?P<whole>3[4-9]|4[0-3]|9[4-9]|10[0-9])(?P<decimal>[.,]\d{1,2})?(?!\d)\s*"
                          r"(?P<unit>[°º]\s*[cf]?|degrees?(?:\s*(?:c|f|celsius|fahrenheit))?|[cf]\b)?", re.IGNORECASE)
_TEMPERATURE_SAID = re.compile(r"(?:temp(?:erature)?|fever|fiebre|fièvre|fieber|febre|thermometer|term[oó]metro|reads?|"
                               r"reading|measured|under\s+the\s+arm|armpit|rectal(?:ly)?|ear|forehead|of|at|is|was|hit|"
                               r"got|up\s+to|de|tem|hat|a)\W*(?:\w+\W+){0,2}$", re.IGNORECASE)


def _age_in_months(number: str, unit: str) -> float | None:
    n = int(number) if number.isdigit() else _NUMBER_WORDS.get(number.lower(), 1 if number.lower() == "a" else None)
    if n is None:
        return None
    unit = unit.lower()
    if unit[0] in "dtj":                           # days, días, Tage, jours
        return n / 30.4
    if unit[0] == "w" or unit.startswith("sem"):   # weeks, Wochen, semanas, semaines
        return n / 4.35
    return float(n)


def young_infant_temperature(text: str) -> RedFlag | None:
    """A baby under 3 months with a temperature of 38 C (100.4 F) or more, or under 35.5 C, both given as numbers."""
    age = None
    for m in _INFANT_AGE.finditer(text):
        found = [g for g in m.groups() if g]
        if found[0].lower() in ("newborn", "neonate", "new-born") or (
                len(found) >= 2 and (months := _age_in_months(found[0], found[1])) is not None and months < 3):
            age = m.group(0)
            break
    if age is None:
        return None
    for m in _TEMPERATURE.finditer(text):
        unit = (m.group("unit") or "").lower()
        if not (m.group("decimal") or unit or _TEMPERATURE_SAID.search(text[max(0, m.start() - 25):m.start()])):
            continue   # a number, not a temperature
        value = float(m.group("whole") + (m.group("decimal") or "").replace(",", "."))
        celsius = (value - 32) * 5 / 9 if "f" in unit or value >= 94 else value
        if celsius >= 38.0 or celsius < 35.5:
            return RedFlag("child_danger", [age, m.group(0).strip()])
    return None


def _clauses(text: str) -> list[str]:
    return [c for c in _CLAUSE_SPLIT.split(text) if c and c.strip()]


def _mention_spans(clause: str) -> list[tuple[int, int]]:
    """Where the clause names a red flag, by any pattern."""
    return [m.span() for alternatives in RED_FLAG_PATTERNS.values() for patterns in alternatives
            for pattern in patterns for m in pattern.finditer(clause)]


def _negator_start(clause: str, start: int) -> int | None:
    """Where the negator governing the mention at `start` begins: within the 6 words before it, not across a
    comma ("No, he is not responding" keeps "not responding" un-negated) and not inside another mention ("can't
    move his arm and his face has dropped": that "can't" is a symptom, not a negation); None if there is none."""
    words = list(re.finditer(r"\S+", clause[:start]))[-_NEGATION_WINDOW:]
    if not words:
        return None
    window_start = words[0].start()
    comma = clause.rfind(",", window_start, start)
    window_start = max(window_start, comma + 1)
    mentions = _mention_spans(clause)
    found = [window_start + m.start() for m in re.finditer(_NEGATOR, clause[window_start:start], re.IGNORECASE)
             if not any(a <= window_start + m.start() < b for a, b in mentions)]
    return found[-1] if found else None


def _negated(clause: str, start: int) -> bool:
    return _negator_start(clause, start) is not None


def strip_negated(text: str) -> str:
    """The message without its negated red-flag mentions (from the negator to the end of the mention):
    "I am not suicidal, just tired" -> "I am , just tired". What is left is what the message affirms.
    A message with no negated mention comes back unchanged (the same string)."""
    kept, negated = [], False
    for clause in _clauses(text):
        spans = []
        for alternatives in RED_FLAG_PATTERNS.values():
            for patterns in alternatives:
                for pattern in patterns:
                    for m in pattern.finditer(clause):
                        negator = _negator_start(clause, m.start())
                        if negator is not None:  # to the end of the word: "suicid" takes "suicidal" with it
                            spans.append((negator, m.end() + len(re.match(r"\w*", clause[m.end():]).group())))
        for a, b in sorted(spans, reverse=True):
            clause = clause[:a] + " " + clause[b:]
        negated = negated or bool(spans)
        kept.append(" ".join(clause.split()))
    return ". ".join(c for c in kept if c) if negated else text


def _unnegated_match(pattern: re.Pattern[str], clauses: list[str]) -> str | None:
    for clause in clauses:
        for m in pattern.finditer(clause):
            if not _negated(clause, m.start()):
                return m.group(0)
    return None


def detect_red_flags(text: str) -> list[RedFlag]:
    """Red-flag categories whose patterns all match, un-negated, in the message."""
    clauses = _clauses(text)
    flags = []
    for category, alternatives in RED_FLAG_PATTERNS.items():
        for patterns in alternatives:
            evidence = [_unnegated_match(p, clauses) for p in patterns]
            if all(e is not None for e in evidence):
                flags.append(RedFlag(category, [e for e in evidence if e]))
                break
    infant = young_infant_temperature(text)   # numbers compared, not matched: outside the pattern table
    if infant and not any(f.category == infant.category for f in flags):
        flags.append(infant)
    return flags


def urgent_message(flags: list[RedFlag]) -> str:
    """The general line, then each flagged category's own action once."""
    actions = list(dict.fromkeys(URGENT_ACTIONS[f.category] for f in flags))
    return " ".join([URGENT_MESSAGE, *actions])


_DOSE = re.compile(
    r"\b\d+(?:[.,]\d+)?\s*(?:mg|mcg|µg|ug|g|grams?|ml|mL|milligrams?|micrograms?|units?|iu|IU|tablets?|pills?|capsules?|puffs?|drops?)\b"
    r"|\b(?:once|twice|three\s+times|four\s+times)\s+(?:a|per)\s+day\b|\bevery\s+\d+\s*(?:-\s*\d+\s*)?hours?\b"
    r"|\b\d+\s+times\s+(?:a|per)\s+day\b|\b(?:for|over)\s+\d+\s+(?:days?|weeks?|months?)\b", re.IGNORECASE)


def mentions_dose(text: str) -> bool:
    """Whether an answer states a dose or a regimen ("10 mg", "twice a day", "every 6 hours", "for 4 weeks")."""
    return _DOSE.search(text) is not None


@dataclass
class CleanInput:
    text: str
    notices: list[str]
    empty: bool


def clean_input(text: str | None, max_chars: int, special_tokens: list[str] = ()) -> CleanInput:
    """Strip, cut to max_chars (with a notice) and remove chat-template control tokens, so a user
    cannot open a fake system turn by typing "<|im_start|>system"."""
    notices: list[str] = []
    text = "" if text is None else str(text)
    text = text.replace("\x00", "").strip()
    if len(text) > max_chars:
        notices.append(f"Your message was {len(text):,} characters long; only the first {max_chars:,} were read.")
        text = text[:max_chars].rstrip()
    for token in special_tokens:
        if token and token in text:
            text = text.replace(token, " ")
    text = text.strip()
    return CleanInput(text, notices, empty=not text)


# Words frequent in each language the detector was trained to read and rare in the others: enough to tell a
# message in Spanish, French, German or Portuguese from English without a language-identification model.
_LANGUAGE_WORDS = {
    "en": "the and is i i'm my to of in it have has with for on he she what how can this that was you do me "
          "been feel after since about should does are not no just but got",
    "es": "el los las que y en una un es mi mis por con para tengo tiene está estoy muy pero qué cómo cuánto cuánta "
          "dolor hijo hija del al hace puedo debo mí mucho desde ayuda sangre pecho madre padre bebé niño niña años "
          "días noche mejor ya se tomado caja entera cara cuesta respirar duermo últimamente vuelvo médico favor "
          "cuando porque sin nada",
    "fr": "le les des et est je j'ai mon ma mes une un pas qui avec pour dans il elle ai suis très mal fils fille ne "
          "depuis mère père bébé sang poitrine jours ans c'est n'est sens mieux beaucoup combien faut boire par "
          "jour comment faire sans médicaments du au aux d'eau ça vous nous quoi plus rien peux dois respire",
    "de": "der die das und ist ich mein meine nicht mit ein eine habe hab bin sehr auf zu er sie seit kann wie "
          "schmerzen hilfe meiner mutter vater blut brust tagen jahren keine noch nie im kam vor minuten mir geht's "
          "schon viel besser wasser sollte am tag trinken kopfweh kind sohn tochter mann frau atmet arzt "
          # function words (a short German message had too few of the words above and was read as English)
          "nur nach dem den wenn aber auch oder für über bei wir sich von aus hat wird jetzt heute gestern hilft soll "
          "muss dass weil etwas uns sind mich bitte immer wieder mehr zum zur beim vom einen einem einer kein seine "
          "ihre gut",
    "pt": "o os que e em um uma é meu minha não com para estou tenho muito dor filho filha está do da na já "
          "apliquei caneta mas marido continua sem conseguir respirar direito como faz quero caso dia precise "
          "apareceram umas no braço outros quanta água devo beber por sentindo bem melhor bom café eu fico pouco "
          "baixar remédio você mãe pai bebê sangue peito dias anos",
}
# Distress said in Spanish, French, German or Portuguese: how someone says they feel lonely, sad, overwhelmed, anxious
# or devastated, or cry all the time. The classifier reads these languages through an English encoder and often
# misses distress there, and in another language a missed one gets only the English-only note (issue 27). Feelings
# only, never a symptom or a topic: "me siento cansado", "ich mache mir Sorgen um meinen Husten" name none of these.
_FEEL = r"(?:muy|tan|super|súper|bastante|tellement|très|si|trop|complètement|so|total|sehr|völlig|ganz|echt|einfach|muito|tão|bem)\s+"
DISTRESS_OTHER_LANGUAGES = _rx(
    # es
    r"me\s+siento\s+(?:" + _FEEL + r")?(?:sol[oa]|triste|vací[oa]|hundid[oa]|desesperad[oa]|abrumad[oa]|agobiad[oa]|inútil|fatal)",
    r"estoy\s+(?:" + _FEEL + r")?(?:triste|deprimid[oa]|desesperad[oa]|angustiad[oa]|hundid[oa]|agobiad[oa]|quemad[oa]|quemadísim[oa]|"
    r"nervios[oa]|ansios[oa]|destrozad[oa])", r"estoy\s+" + _FEEL + r"sol[oa]\b",
    r"me\s+(?:agobia|angustia)\s+todo", r"(?:no\s+puedo\s+(?:parar|dejar)\s+de|solo)\s+llor", r"lloro\s+(?:todos\s+los\s+días|cada\s+noche|sin\s+parar|todo\s+el\s+día)",
    r"no\s+tengo\s+ganas\s+de\s+nada", r"me\s+da\s+mucha\s+ansiedad", r"(?:tengo|siento)\s+mucha\s+ansiedad",
    # fr
    r"je\s+me\s+sens\s+(?:" + _FEEL + r")?(?:seule?|triste|vide|perdue?|nulle?|déprimée?|submergée?|débordée?)",
    r"je\s+suis\s+(?:" + _FEEL + r")?(?:triste|déprimée?|angoissée?|à\s+bout|anxieux|anxieuse|stressée?|effondrée?|dévastée?)", r"je\s+suis\s+" + _FEEL + r"seule?\b",
    r"j'ai\s+du\s+mal\s+à\s+m'en\s+remettre", r"je\s+pleure\s+(?:tous\s+les\s+jours|tout\s+le\s+temps|sans\s+arrêt|même)",
    r"plus\s+d'énergie\s+pour\s+rien",
    # de
    r"(?:ich\s+bin|ich\s+fühle\s+mich|fühle\s+mich|bin\s+ich)\s+(?:" + _FEEL + r")?(?:traurig|einsam|verzweifelt|überfordert|niedergeschlagen|"
    r"deprimiert|am\s+ende|ausgebrannt|gestresst|nervös|fertig\b(?!\s+mit\s+(?:dem|der)\s+arbeit))",
    r"ich\s+(?:weine|heule?|heul)\s+(?:nur\s+noch|jeden\s+tag|ständig|die\s+ganze\s+zeit)", r"kann\s+nur\s+noch\s+weinen",
    r"mir\s+geht'?s\s+(?:heute\s+)?(?:echt\s+|total\s+|so\s+)?(?:mies|dreckig|beschissen)",
    # pt
    r"(?:me\s+sinto|sinto-me)\s+(?:" + _FEEL + r")?(?:sozinh[oa]|triste|vazi[oa]|deprimid[oa]|desesperad[oa]|angustiad[oa]|"
    r"ansios[oa]|esgotad[oa]|sobrecarregad[oa]|arrasad[oa]|um\s+falhad[oa]|uma\s+falhad[oa])",
    r"(?:estou|tô|to)\s+(?:" + _FEEL + r")?(?:triste|deprimid[oa]|desesperad[oa]|angustiad[oa]|ansios[oa]|esgotad[oa]|"
    r"sobrecarregad[oa]|arrasad[oa]|nervos[oa])", r"(?:estou|tô|to)\s+" + _FEEL + r"sozinh[oa]",
    r"(?:tô|to|estou)\s+me\s+sentindo\s+(?:" + _FEEL + r")?(?:sozinh[oa]|triste|vazi[oa]|sobrecarregad[oa]|esgotad[oa])",
    r"(?:só|so)\s+choro", r"choro\s+(?:todos\s+os\s+dias|o\s+tempo\s+todo|sem\s+parar)", r"não\s+tenho\s+vontade\s+de\s+nada",
    r"(?:estou|tô)\s+cheio\s+de\s+(?:ansiedade|preocupações)", r"me\s+deixando\s+(?:exaust[oa]|esgotad[oa])")


def distress_in_other_language(text: str) -> str | None:
    """The words of an un-negated expression of distress in Spanish, French, German or Portuguese ("me siento
    muy sola"), else None ("no estoy triste" is not one)."""
    return _unnegated_match(DISTRESS_OTHER_LANGUAGES, _clauses(text))


# Greetings and thanks that settle a short message on their own.
_GREETINGS = {"es": "hola buenas gracias", "fr": "bonjour merci salut", "de": "hallo danke", "pt": "olá obrigado obrigada"}
_LANGUAGE_SETS = {lang: set(words.split()) for lang, words in _LANGUAGE_WORDS.items()}
_LETTERS = {"es": "ñ¿¡", "pt": "ãõ", "de": "ßäöü", "fr": "èêëàùœ"}


def language_of(text: str) -> str:
    """"en", "es", "fr", "de" or "pt": the language whose frequent words (and letters only it uses) the message has
    most of. English unless another language has at least two such signs and more than English has."""
    words = re.findall(r"[^\W\d_]+(?:'[^\W\d_]+)?", text.lower())
    score = {lang: sum(w in vocabulary for w in words) for lang, vocabulary in _LANGUAGE_SETS.items()}
    for lang, greetings in _GREETINGS.items():
        score[lang] += 2 * sum(w in greetings.split() for w in words)
    for lang, letters in _LETTERS.items():
        score[lang] += 2 * sum(text.lower().count(ch) for ch in letters)
    best = max(score, key=lambda lang: (score[lang], lang == "en"))
    return best if best != "en" and score[best] >= 2 and score[best] > score["en"] else "en"
