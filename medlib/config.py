"""Recipes: one YAML file per profile and run, parsed once into typed, frozen dataclasses.

    medlib/recipes/<profile>/<name>.yaml  --(presets, --set key=value)-->  TrainRecipe | EvalRecipe | ChatRecipe | StudyRecipe

The file's `kind:` picks the class. Every key is checked against the class's annotations when the
file is read: an unknown key, a missing key or a wrong type is a RecipeError naming the file, the
key, the expected type and the value. `--set key.sub=value` (the CLI) and size presets edit the
YAML mapping before it is typed; in-process code changes a typed recipe with `.replace(...)`,
which checks types the same way. Recipes say what to do; where a run writes is derived by
`medlib.pipeline.Layout` from the output root and the run's name.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import types
import typing
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Iterable, Literal, Union

import yaml

from medlib.paths import PACKAGE_DIR

RECIPE_DIR = PACKAGE_DIR / "recipes"
PRESET_DIR = RECIPE_DIR / "presets"
PROFILES = ("local", "paper")
Count = Union[int, float, None]  # a row count (int >= 0), a ratio of the available rows (0 < float < 1), or null = all


class RecipeError(ValueError):
    """A recipe or an override is invalid; the message names the file and key."""


# ------------------------------------------------------------------------------------ typing machinery


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is tuple:
        return f"a list of {_type_name(args[0])}"
    if origin is dict:
        return f"a mapping of {_type_name(args[0])} to {_type_name(args[1])}"
    if is_dataclass(tp):
        return f"a mapping ({tp.__name__})"
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false"}.get(tp, getattr(tp, "__name__", str(tp)))


def _coerce(tp: Any, value: Any, key: str, source: str) -> Any:
    """`value` as type `tp` (YAML lists become tuples, mappings dataclasses); anything else is a RecipeError."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    bad = RecipeError(f"{source}: {key} must be {_type_name(tp)}, got {value!r}")
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None:
            if type(None) in args:
                return None
            raise bad
        for option in args:
            if option is type(None):
                continue
            try:
                return _coerce(option, value, key, source)
            except RecipeError as exc:
                if is_dataclass(option) and isinstance(value, dict):
                    raise exc  # the mapping's own error says more than "must be X or null"
        raise bad
    if origin is Literal:
        if value in args:
            return value
        raise bad
    if is_dataclass(tp):
        if isinstance(value, tp):
            return value
        return _from_mapping(tp, value, key, source)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise bad
        return tuple(_coerce(args[0], v, f"{key}[{i}]", source) for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise bad
        return {_coerce(args[0], k, f"{key} key", source): _coerce(args[1], v, f"{key}.{k}", source) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad
    raise TypeError(f"recipe field {key}: unsupported annotation {tp!r}")  # a bug in a Section class


def _from_mapping(cls: type, data: Any, where: str, source: str) -> Any:
    label = where or "the top level"
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: {label} must be a mapping ({cls.__name__}), got {data!r}")
    hints = typing.get_type_hints(cls)
    known = [f.name for f in fields(cls) if f.init and not f.metadata.get("bookkeeping")]
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise RecipeError(f"{source}: unknown key {'.'.join(filter(None, [where, unknown[0]]))!r}; "
                          f"known under {label}: {', '.join(known)}")
    kwargs = {}
    for f in fields(cls):
        if f.name not in known:
            continue
        key = f"{where}.{f.name}" if where else f.name
        if f.name not in data:
            if f.default is MISSING and f.default_factory is MISSING:
                raise RecipeError(f"{source}: missing key {key!r} ({_type_name(hints[f.name])})")
            continue
        kwargs[f.name] = _coerce(hints[f.name], data[f.name], key, source)
    return cls(**kwargs)


@dataclass(frozen=True)
class Section:
    """A typed, frozen part of a recipe. `replace` returns a changed copy, type-checked like the file."""

    def replace(self, **changes: Any) -> Any:
        hints = typing.get_type_hints(type(self))
        names = {f.name for f in fields(self)}
        for name, value in changes.items():
            if name not in names:
                raise RecipeError(f"{type(self).__name__} has no field {name!r}; known: {', '.join(sorted(names))}")
            changes[name] = _coerce(hints[name], value, f"{type(self).__name__}.{name}", "replace()")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML/JSON values (tuples as lists), bookkeeping fields left out."""
        out = json.loads(json.dumps(dataclasses.asdict(self), default=str))
        for f in fields(self):
            if f.metadata.get("bookkeeping"):
                out.pop(f.name, None)
        return out


def _bookkeeping(default: Any) -> Any:
    return field(default=default, compare=False, metadata={"bookkeeping": True})


# ------------------------------------------------------------------------------------------- sections


@dataclass(frozen=True)
class ModelSettings(Section):
    name: str                      # Hub id, local folder, or pypi:<package> (a model shipped on PyPI)
    backend: Literal["auto", "unsloth", "hf"] = "auto"
    load_in_4bit: bool = True
    max_seq_length: int = 512


@dataclass(frozen=True)
class PromptSettings(Section):
    system_prompt: str | None = None   # null: medlib.prompts.SYSTEM_PROMPT (the paper's Figure 2)
    target_style: Literal["letter", "letter_text", "authors"] = "letter"   # authors: "Answer: B) option text"
    mcq_format: Literal["medlib", "authors"] = "medlib"   # the question's user turn; authors: "Question:/Options:/A) …"
    chat_template: Literal["native", "chatml"] = "native"   # chatml: Unsloth's, <|im_end|> mapped to EOS (the authors')


@dataclass(frozen=True)
class SourceSpec(Section):
    source: str
    split: str
    n: Count = None                # stage 1: rows taken
    n_train: Count = None          # dialogue sources: train rows (of what is left after validation)
    n_validation: Count = None     # dialogue sources: validation rows


@dataclass(frozen=True)
class ReplaySettings(Section):
    """Stage-1 rows replayed in stage 2 (DMT), drawn from the stage-1 mixture the run is handed."""
    n_train: Count = None
    n_validation: Count = None


@dataclass(frozen=True)
class DataSettings(Section):
    seed: int
    sources: tuple[SourceSpec, ...]
    data_dir: str | None = None        # folder of the published files; null: the Hub
    eval_data_dir: str | None = None   # decontamination reads evaluation sets here first
    hub: bool = False                  # true: a source missing from the folders is read from the Hub; false: an error
    hub_mirror: str | None = None      # a folder laid out like the Hub (<owner>/<dataset>/), read by datasets.load_dataset
    order: Literal["medlib", "authors"] = "medlib"   # medlib: seeded random draws; authors: their datasets
                                       # shuffle(seed) + train_test_split(seed) order, so the rows match theirs
    standin_note: str | None = None    # said in every manifest when the data stands in for the paper's
    strict: bool = True                # a bad row is an error (false: skipped and reported)
    turn_rule: Literal["medlib", "authors"] = "medlib"   # NoteChat text -> turns: authors (every "Doctor:" removed,
                                       # empty turns kept) | medlib (the prefix only; empty turns dropped)
    decontaminate: Literal["drop", "report", "off"] = "drop"   # training rows that repeat an evaluation item:
                                       # drop them (and say how many), only report them, or do not look
    ngram_threshold: float | None = 0.5   # a row holding this share of an evaluation item's 13-grams repeats it
                                       # (null: duplicates only)
    validation_fraction: float | None = None   # stage 1: share of the pool held out for validation loss
    replay: ReplaySettings | None = None


@dataclass(frozen=True)
class LoraSettings(Section):
    r: int
    alpha: int
    dropout: float = 0.0
    bias: Literal["none", "all", "lora_only"] = "none"
    use_rslora: bool = True
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class TrainingSettings(Section):
    """Every key but those in MEDLIB_ONLY is an SFTConfig argument of the same name, passed as it is (after the
    machine fallbacks medlib.training.arguments records); `sft:` passes any other SFTConfig argument through."""
    learning_rate: float
    per_device_train_batch_size: int
    max_steps: int                     # -1: num_train_epochs full epochs
    weight_decay: float = 0.0
    gradient_accumulation_steps: int = 1
    warmup_steps: int = 0
    num_train_epochs: float = 1.0
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    optim: str = "adamw_torch"
    lr_scheduler_type: str = "linear"
    logging_steps: int = 10
    eval_steps: int = 100
    save_steps: int = 100
    save_total_limit: int | None = 2
    per_device_eval_batch_size: int = 8
    gradient_checkpointing: Literal["auto"] | bool = "auto"
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    packing: bool = False
    packing_strategy: Literal["bfd", "constant_length"] = "bfd"   # bfd: TRL's, padding-free, examples kept
                                       # apart; constant_length: the authors' (trl<0.9 ConstantLengthDataset)
    loss_on: Literal["assistant", "all"] = "assistant"   # all: the whole text, system and user turns too (the authors')
    padding_free: bool = False
    export_merged_16bit: bool = False
    export_gguf: str | None = None
    sft: dict[str, Any] = field(default_factory=dict)   # any other SFTConfig argument, by its own name (checked
                                       # against SFTConfig's fields when the recipe loads)


# TrainingSettings keys that are medlib's, not SFTConfig's: medlib acts on them before the trainer is built.
MEDLIB_ONLY = ("max_train_samples", "max_eval_samples", "precision", "packing_strategy", "loss_on",
               "export_merged_16bit", "export_gguf", "sft")


@dataclass(frozen=True)
class RecipeMeta:
    recipe_file: str = "?"
    overrides: tuple[str, ...] = ()


@dataclass(frozen=True)
class TrainRecipe(Section):
    """One training run: stage 1 (Med-Mix), stage 2 (Med-Nirvana) or a single-stage chatbot (handoff: from_base)."""
    kind: Literal["train"]
    profile: str
    note: str                          # what this profile is, said in every output of the run
    stage: Literal[1, 2]
    run_name: str                      # the run's folder under the output root
    seed: int
    model: ModelSettings
    prompt: PromptSettings
    data: DataSettings
    lora: LoraSettings
    training: TrainingSettings
    mixture: str                       # the mixture's folder under <output root>/data/
    # stage 2: how it starts from stage 1 (medlib/training/handoff.py): requantized_merge (the authors': merged in
    # 16-bit, reloaded in 4-bit, fresh LoRA) | stacked (stage-1 LoRA frozen on the 4-bit base, fresh LoRA on top)
    # | continue (the stage-1 adapter trains on) | from_base (no stage 1: the seeds' single-stage chatbots)
    handoff: Literal["requantized_merge", "stacked", "continue", "from_base"] | None = None
    from_run: str | None = None        # stage 2: the stage-1 run it starts from and replays
    display_name: str = ""             # its name in tables and model cards (default: run_name)
    about: str = ""
    meta: RecipeMeta = _bookkeeping(RecipeMeta())

    @property
    def uses_stage1(self) -> bool:
        return self.stage == 2 and self.handoff != "from_base"


@dataclass(frozen=True)
class EvalModelSettings(Section):
    name: str
    load_in_4bit: bool = False
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # which weights of a run are scored: as_trained (what the adapter trained against, plus the adapter) |
    # requantized_merge (the run merged in 16-bit and reloaded in 4-bit: what the authors scored and published)
    weights: Literal["as_trained", "requantized_merge"] = "as_trained"


@dataclass(frozen=True)
class EvalSetSpec(Section):
    source: str
    split: str
    holdout: int | None = None         # dialogue sets: the fixed hold-out of this many conversations


@dataclass(frozen=True)
class EvalDataSettings(Section):
    data_dir: str | None = None
    hub: bool = False                  # true: a set missing from data_dir is read from the Hub
    hub_mirror: str | None = None      # a folder laid out like the Hub; read first when set


@dataclass(frozen=True)
class McqGeneration(Section):
    max_new_tokens: int = 8
    do_sample: bool = False            # the authors sampled (Llama 3.1's generation config: temperature 0.6, top_p 0.9)
    temperature: float = 0.6           # used only when sampling
    top_p: float = 0.9


@dataclass(frozen=True)
class McqSettings(Section):
    sets: tuple[str, ...]
    method: Literal["loglik", "generate"] = "loglik"
    limit: int | None = None
    sample_seed: int = 3407
    batch_size: int = 8
    max_length: int = 512
    prefix_cache: bool = True
    bootstrap_samples: int = 1000
    seed: int = 3407
    answer_cue: str = ""               # appended to every question's user turn (the authors': "\nAnswer:")
    parse: Literal["medlib", "authors"] = "medlib"   # generate: medlib's reading, or the authors' "Answer: X" rule
    runs: int = 1                      # sampled generation: runs per model (seeds seed, seed+1, ...), reported as
                                       # mean ± SD (the paper's Med-Nirvana cells fit a mean of three)
    other_protocol: int | None = None  # questions per set also scored by the other protocol (loglik <-> generate,
                                       # generation as mcq.generation says); 0: every question; null: off
    position_bias: int | None = None   # questions per set also scored under every cyclic permutation of their
                                       # options (log-likelihood; 0: every question scored; null: off)
    generation: McqGeneration = McqGeneration()


@dataclass(frozen=True)
class ChatGeneration(Section):
    max_new_tokens: int = 64
    batch_size: int = 8
    do_sample: bool = False
    best_of_n: int = 1
    temperature: float = 0.7
    top_p: float = 0.9
    repetition_penalty: float = 1.0
    seed: int = 3407


@dataclass(frozen=True)
class BertScoreSettings(Section):
    model_type: str
    num_layers: int
    n_queries: int = 50
    lang: str = "en"
    rescale_with_baseline: bool = False
    batch_size: int = 32
    samples_k: int = 5
    paper_samples: bool = True         # also answer the paper's Figures 3-10 queries (figures_3_10.md)
    generation: ChatGeneration = ChatGeneration()


@dataclass(frozen=True)
class ReportSettings(Section):
    banner: str                        # REPORT.md's opening: what this profile's numbers are, and are not
    findings_caveat: str | None = None  # said after the findings
    tables_note: str | None = None      # said under Table 3 about this recipe's rows (results.json carries it)


@dataclass(frozen=True)
class EvalRecipe(Section):
    kind: Literal["eval"]
    profile: str
    note: str
    model: EvalModelSettings
    runs: tuple[str, ...]              # training runs (names under the output root) evaluated beside the base model
    sets: dict[str, EvalSetSpec]       # where each evaluation set lives; MCQ and decontamination both read this
    chat_sets: tuple[EvalSetSpec, ...]  # consumer questions with physicians' answers (BERTScore), drawn from each
                                       # set in proportion to its hold-out
    mcq: McqSettings
    bertscore: BertScoreSettings
    report: ReportSettings
    prompt: PromptSettings = PromptSettings()
    data: EvalDataSettings = EvalDataSettings()
    meta: RecipeMeta = _bookkeeping(RecipeMeta())


@dataclass(frozen=True)
class ChatModelSettings(Section):
    name: str
    load_in_4bit: bool = False


@dataclass(frozen=True)
class SamplingSettings(Section):
    temperature: float = 0.0
    top_p: float = 0.9
    repetition_penalty: float = 1.1
    max_new_tokens: int = 128
    seed: int = 3407


@dataclass(frozen=True)
class HistorySettings(Section):
    max_context_tokens: int = 2048


@dataclass(frozen=True)
class RouterSettings(Section):
    calibration_file: str | None = None
    reference_file: str | None = None


@dataclass(frozen=True)
class GuardrailSettings(Section):
    max_input_chars: int = 4000
    disclaimer: bool = True
    answer_after_red_flag: bool = False
    red_flag_model: str | None = None


@dataclass(frozen=True)
class ServeSettings(Section):
    host: str = "127.0.0.1"
    port: int = 8000
    max_request_bytes: int = 65536
    rate_limit_per_minute: int = 60
    max_queue: int = 32
    transcript: str | None = None


@dataclass(frozen=True)
class ChatRecipe(Section):
    kind: Literal["chat"]
    profile: str
    note: str
    model: ChatModelSettings
    run: str | None                    # the default adapter: this run under the output root (null: the base model)
    prompt: PromptSettings = PromptSettings()
    generation: SamplingSettings = SamplingSettings()
    history: HistorySettings = HistorySettings()
    router: RouterSettings = RouterSettings()
    guardrails: GuardrailSettings = GuardrailSettings()
    serve: ServeSettings = ServeSettings()
    meta: RecipeMeta = _bookkeeping(RecipeMeta())


@dataclass(frozen=True)
class StudyMcq(Section):
    sets: tuple[str, ...]
    limit: int | None = None


@dataclass(frozen=True)
class StudyBertScore(Section):
    n_queries: int = 50


@dataclass(frozen=True)
class StudyRecipe(Section):
    kind: Literal["study"]
    profile: str
    note: str
    shares: tuple[float, ...]          # stage-1 rows' share of the stage-2 training rows, one arm each (compare:
                                       # replay), or the one share every arm trains at (compare: handoff)
    mcq: StudyMcq
    bertscore: StudyBertScore
    compare: Literal["replay", "handoff"] = "replay"   # what the arms differ in
    handoffs: tuple[Literal["requantized_merge", "stacked", "continue"], ...] = ()   # compare: handoff, one arm
                                       # each; the first is the reference every other arm is compared with
    retention_rows: int = 100          # stage-1 validation records whose answer loss measures retention
    from_base: bool = False            # also an arm trained on stage-2 data alone from the base model
    dialogue_train: int | None = None  # null: the stage-2 recipe's
    dialogue_validation: int | None = None
    max_steps: int | None = None
    meta: RecipeMeta = _bookkeeping(RecipeMeta())


RECIPE_CLASSES = {"train": TrainRecipe, "eval": EvalRecipe, "chat": ChatRecipe, "study": StudyRecipe}
Recipe = Union[TrainRecipe, EvalRecipe, ChatRecipe, StudyRecipe]


# --------------------------------------------------------------------------------------------- loading


def recipe_path(profile: str, name: str) -> Path:
    if profile not in PROFILES:
        raise RecipeError(f"unknown profile {profile!r}; choose one of {', '.join(PROFILES)}")
    path = RECIPE_DIR / profile / f"{name}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in (RECIPE_DIR / profile).glob("*.yaml"))
        raise RecipeError(f"no recipe {name!r} for profile {profile!r} ({path}); known: {', '.join(known)}")
    return path


def load_recipe(profile: str, name: str, overrides: Iterable[str] = (), preset: str | None = None,
                kind: str | None = None) -> Any:
    """medlib/recipes/<profile>/<name>.yaml, with a size preset and `key.sub=value` overrides applied,
    as its typed class. `kind` (train, eval, chat, study) makes any other kind an error."""
    path = recipe_path(profile, name)
    mapping = load_yaml(path)
    source = f"{profile}/{name}.yaml"
    overrides = [*preset_overrides(preset, profile, name, mapping), *overrides]
    mapping = apply_overrides(mapping, overrides, source=source)
    found = mapping.get("kind")
    if found not in RECIPE_CLASSES:
        raise RecipeError(f"{source}: kind must be one of {', '.join(RECIPE_CLASSES)}, got {found!r}")
    if kind is not None and found != kind:
        raise RecipeError(f"{source} is a {found} recipe, not a {kind} recipe")
    if mapping.get("profile") != profile:
        raise RecipeError(f"{source}: profile must be {profile!r} (the folder it is in), got {mapping.get('profile')!r}")
    try:
        recipe = _from_mapping(RECIPE_CLASSES[found], mapping, "", source)
    except RecipeError as exc:
        keys = [item.split("=", 1)[0] for item in overrides]
        said = [item for item, key in zip(overrides, keys) if key and key in str(exc)]
        raise RecipeError(f"{exc} (set by {', '.join(said)})" if said else str(exc)) from None
    return dataclasses.replace(recipe, meta=RecipeMeta(source, tuple(overrides)))


def load_train(profile: str, name: str | int, overrides: Iterable[str] = (), preset: str | None = None) -> TrainRecipe:
    """A training recipe by name, or by stage number (1 -> stage1.yaml, 2 -> stage2.yaml)."""
    if isinstance(name, int) or str(name).isdigit():
        if int(name) not in (1, 2):
            raise RecipeError(f"unknown stage {name!r}; choose 1 or 2")
        name = f"stage{int(name)}"
    recipe = load_recipe(profile, str(name), overrides, preset, kind="train")
    check_sft_arguments(recipe.training.sft, recipe.meta.recipe_file)
    return recipe


def check_sft_arguments(sft: dict[str, Any], source: str) -> None:
    """training.sft's keys must be SFTConfig's own (TRL is imported only when there is something to check)."""
    if not sft:
        return
    from trl import SFTConfig

    known = {f.name for f in dataclasses.fields(SFTConfig)}
    typed = {f.name for f in fields(TrainingSettings)}
    for key in sft:
        if key not in known:
            raise RecipeError(f"{source}: training.sft.{key} is not an SFTConfig argument (TRL's SFTConfig has no field {key!r})")
        if key in typed:
            raise RecipeError(f"{source}: training.sft.{key}: set it as training.{key}, its typed key")


def load_eval(profile: str, overrides: Iterable[str] = (), preset: str | None = None) -> EvalRecipe:
    return load_recipe(profile, "eval", overrides, preset, kind="eval")


def load_chat(profile: str, overrides: Iterable[str] = (), preset: str | None = None) -> ChatRecipe:
    return load_recipe(profile, "chat", overrides, preset, kind="chat")


def load_study(profile: str, overrides: Iterable[str] = (), name: str = "dmt") -> StudyRecipe:
    """medlib/recipes/<profile>/study_<name>.yaml (dmt: the replay study; handoff: the handoff study)."""
    return load_recipe(profile, f"study_{name}", overrides, kind="study")


def parse_value(text: str) -> Any:
    """YAML scalar parsing, so `--set training.max_steps=20` gives an int and `lr=3e-4` a float."""
    value = yaml.safe_load(text) if text != "" else ""
    # PyYAML reads 3e-4 as a string (YAML 1.1); accept it as a float as users expect.
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


PASS_THROUGH = ("sft", "sets")   # open mappings: --set training.sft.max_grad_norm=0.5 or --set sets.toy={...} adds a key


def apply_overrides(mapping: dict[str, Any], overrides: Iterable[str], source: str = "recipe") -> dict[str, Any]:
    """`key.sub=value` edits of a recipe's YAML mapping (the CLI's --set); an unknown key is an error."""
    out = copy.deepcopy(mapping)
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"override {item!r} must look like key.sub=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node = out
        for i, part in enumerate(parts):
            open_mapping = i > 0 and parts[i - 1] in PASS_THROUGH and isinstance(node, dict)
            if not isinstance(node, dict) or (part not in node and not open_mapping):
                where = ".".join(parts[:i]) or "<top>"
                known = ", ".join(sorted(node)) if isinstance(node, dict) else "(not a mapping)"
                raise RecipeError(f"unknown recipe key {key!r} in {source}: no {part!r} under {where}; known: {known}")
            if i == len(parts) - 1:
                node[part] = parse_value(raw)
            else:
                node = node[part]
    return out


def _section(item: str) -> str:
    return item.split("=", 1)[0].strip().split(".")[0]


def overrides_for(kind: str, overrides: Iterable[str]) -> list[str]:
    """The `key.sub=value` overrides a `kind` recipe (train, eval, chat, study) takes: those whose first key is
    one of its sections. One list serves a notebook run of every kind: `data.data_dir=...` reaches the training
    and evaluation recipes alike, `training.max_steps=4` the training recipes only."""
    sections = {f.name for f in dataclasses.fields(RECIPE_CLASSES[kind])} - {"kind", "profile", "meta"}
    return [item for item in overrides if _section(item) in sections]


def check_overrides(overrides: Iterable[str], kinds: Iterable[str]) -> list[str]:
    """The overrides as a list; one that no recipe of `kinds` takes is an error naming it and what would."""
    if isinstance(overrides, str):
        raise RecipeError(f"overrides must be a list of key=value strings, got the string {overrides!r}")
    overrides, kinds = list(overrides), tuple(kinds)
    for item in overrides:
        if not isinstance(item, str) or "=" not in item:
            raise RecipeError(f"override {item!r} must look like key.sub=value")
        if not any(item in overrides_for(kind, [item]) for kind in kinds):
            known = {kind: sorted({f.name for f in dataclasses.fields(RECIPE_CLASSES[kind])} - {"kind", "profile", "meta"})
                     for kind in kinds}
            raise RecipeError(f"override {item!r}: no {' or '.join(kinds)} recipe has a section {_section(item)!r}; "
                              + "; ".join(f"{kind}: {', '.join(names)}" for kind, names in known.items()))
    return overrides


def load_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping from a file; anything else is an error naming the file."""
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: top level must be a mapping")
    return data


def preset_overrides(preset: str | None, profile: str, name: str, mapping: dict[str, Any] | None = None) -> list[str]:
    """`key=value` overrides of a size preset (medlib/recipes/presets/<preset>.yaml) for one recipe.
    The preset's section is the recipe's name (stage1, stage2, eval, chat). A preset belongs to one
    profile; any other is an error."""
    if not preset:
        return []
    path = PRESET_DIR / f"{preset}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
        raise RecipeError(f"no preset {preset!r} ({path}); known: {', '.join(known)}")
    data = load_yaml(path)
    if data.get("profile") != profile:
        raise RecipeError(f"{path}: preset {preset!r} is for the {data.get('profile')!r} profile, not {profile!r}")
    values = data.get(name) or {}
    if not isinstance(values, dict):
        raise RecipeError(f"{path}: {name!r} must be a mapping of recipe keys to values")
    return [f"{key}={json.dumps(value)}" for key, value in values.items()]


def save_resolved(recipe: Section, path: str | Path) -> Path:
    """The typed recipe as YAML (what a run actually used), with the file and overrides it came from."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = recipe.to_dict()
    meta = getattr(recipe, "meta", None)
    if meta is not None:
        data["_from"] = {"recipe_file": meta.recipe_file, "overrides": list(meta.overrides)}
    with open(path, "w") as f:
        yaml.safe_dump(data, f, sort_keys=False)
    return path


def load_resolved(path: str | Path, cls: type = TrainRecipe) -> Any:
    """A run folder's recipe.resolved.yaml as its typed class."""
    data = load_yaml(path)
    meta = data.pop("_from", {}) or {}
    recipe = _from_mapping(cls, data, "", str(path))
    return dataclasses.replace(recipe, meta=RecipeMeta(meta.get("recipe_file", "?"), tuple(meta.get("overrides", ()))))
