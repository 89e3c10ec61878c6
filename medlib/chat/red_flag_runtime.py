"""The red-flag classifier as the chat runs it: ONNX Runtime, int8 weights, no torch.

Training (medlib.chat.red_flags) fine-tunes the members, all-MiniLM-L6-v2 + LoRA + two heads each, in torch;
`export_runtime` then merges each adapter, exports every member's encoder + mean pooling + heads and the mean of
their probabilities as one ONNX graph, quantises its matrix weights to int8 (ONNX Runtime's dynamic quantisation:
int8 weights, activations quantised per call), and writes two files:

    runtime.onnx            the graph only: every weight is an external reference, no data
    runtime.safetensors     the weights (int8 matrices, their scales and zero points, the float rest)

`RuntimeClassifier.load` hands the safetensors tensors to ONNX Runtime as those external initializers, so
weights travel only as safetensors. The thresholds and every held-out number are measured on this runtime,
not on the torch model it came from. Why: torch alone is ~220 MB resident before any model, over the chat's
300 MB budget for the detector; this runtime needs neither torch nor transformers (benchmarks/red_flag_latency.py).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Sequence

from medlib.models import MINILM, resolve_model_path

GRAPH_FILE = "runtime.onnx"
WEIGHTS_FILE = "runtime.safetensors"
INPUTS = ("input_ids", "attention_mask", "token_type_ids")
OPSET = 17


def export_runtime(members: Sequence[Any], model_dir: str | Path, tiers: Sequence[str], categories: Sequence[str]) -> dict[str, Any]:
    """Write runtime.onnx + runtime.safetensors for trained RedFlagClassifier members; returns what was written.
    The graph's outputs are the log of the members' mean probabilities, so the runtime's softmax gives that mean."""
    import copy

    import onnx
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from safetensors.numpy import save_file

    model_dir = Path(model_dir)

    class Member(torch.nn.Module):  # a classifier's probabilities(): encoder, masked mean, unit norm, x10, two heads
        def __init__(self, classifier: Any):
            super().__init__()
            encoder = copy.deepcopy(classifier.encoder)
            self.encoder = encoder.merge_and_unload() if hasattr(encoder, "merge_and_unload") else encoder
            heads = copy.deepcopy(classifier.heads)
            self.tier, self.category = heads["tier"], heads["category"]

        def forward(self, input_ids, attention_mask, token_type_ids):
            hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask,
                                  token_type_ids=token_type_ids).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9), dim=-1) * 10.0
            return torch.softmax(self.tier(pooled), -1), torch.softmax(self.category(pooled), -1)

    class Whole(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.members = torch.nn.ModuleList(Member(c) for c in members)

        def forward(self, input_ids, attention_mask, token_type_ids):
            outputs = [m(input_ids, attention_mask, token_type_ids) for m in self.members]
            return tuple(torch.log(torch.stack(probs).mean(0)) for probs in zip(*outputs))

    whole = Whole().eval()
    sample = members[0].tokenizer(["a message", "another, longer message to export"], padding=True, return_tensors="pt")
    axes = {"batch": 0, "tokens": 1}
    with tempfile.TemporaryDirectory() as tmp:
        float_file, int8_file = Path(tmp) / "float.onnx", Path(tmp) / "int8.onnx"
        with torch.inference_mode():
            torch.onnx.export(whole, tuple(sample[name] for name in INPUTS), str(float_file), dynamo=False,
                              input_names=list(INPUTS), output_names=["tier_log_probs", "category_log_probs"],
                              dynamic_axes={**{name: {v: k for k, v in axes.items()} for name in INPUTS},
                                            "tier_log_probs": {0: "batch"}, "category_log_probs": {0: "batch"}},
                              opset_version=OPSET)
        _use_weights_directly(float_file)
        # Gather too: the word-embedding table is half the encoder's weights
        # reduce_range (7-bit weights): no int16 saturation on CPUs without VNNI, so every x86 CPU computes the same
        quantize_dynamic(str(float_file), str(int8_file), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gather"],
                         per_channel=True, reduce_range=True)
        graph = onnx.load(str(int8_file))
    weights = {}
    for tensor in graph.graph.initializer:  # every weight leaves the graph for safetensors
        weights[tensor.name] = onnx.numpy_helper.to_array(tensor).copy()
        tensor.ClearField("raw_data")
        for field in ("float_data", "int32_data", "int64_data", "double_data"):
            tensor.ClearField(field)
        tensor.data_location = onnx.TensorProto.EXTERNAL
        del tensor.external_data[:]
        for key, value in (("location", WEIGHTS_FILE), ("offset", "0"), ("length", str(weights[tensor.name].nbytes))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
    graph.metadata_props.add(key="labels", value=json.dumps({"tiers": list(tiers), "categories": list(categories)}))
    model_dir.mkdir(parents=True, exist_ok=True)
    onnx.save_model(graph, str(model_dir / GRAPH_FILE))
    save_file(weights, str(model_dir / WEIGHTS_FILE))
    return {"graph": GRAPH_FILE, "weights": WEIGHTS_FILE, "members": len(members), "initializers": len(weights),
            "weights_mb": round(sum(w.nbytes for w in weights.values()) / 2**20, 1), "quantisation": "dynamic int8 (QInt8 weights, per channel, 7-bit range)",
            "onnx_opset": OPSET}


def _use_weights_directly(path: Path) -> None:
    """Members share their frozen weights (the word embeddings above all); the exporter reads the second use of a
    weight through an Identity node, which the quantiser does not see through, so that copy would stay float
    (47 MB). Each consumer reads the weight itself instead."""
    import onnx

    model = onnx.load(str(path))
    weights = {t.name for t in model.graph.initializer}
    alias = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "Identity" and n.input[0] in weights}
    if not alias:
        return
    kept = [n for n in model.graph.node if not (n.op_type == "Identity" and n.output[0] in alias)]
    for node in kept:
        node.input[:] = [alias.get(name, name) for name in node.input]
    for output in model.graph.output:
        if output.name in alias:
            raise RuntimeError(f"graph output {output.name} is a bare weight")
    del model.graph.node[:]
    model.graph.node.extend(kept)
    onnx.save_model(model, str(path))


class RuntimeClassifier:
    """Per-text tier and category probabilities from runtime.onnx + runtime.safetensors (ONNX Runtime, CPU)."""

    def __init__(self, session: Any, tokenizer: Any, tiers: Sequence[str], categories: Sequence[str]):
        self.session, self.tokenizer = session, tokenizer
        self.tiers, self.categories = tuple(tiers), tuple(categories)

    @classmethod
    def load(cls, model_dir: str | Path, threads: int | None = None, max_length: int = 128) -> "RuntimeClassifier":
        import onnxruntime as ort
        from safetensors.numpy import load_file
        from tokenizers import Tokenizer

        model_dir = Path(model_dir)
        graph_file, weights_file = model_dir / GRAPH_FILE, model_dir / WEIGHTS_FILE
        for path in (graph_file, weights_file):
            if not path.exists():
                raise FileNotFoundError(f"red-flag runtime {path} is missing; run: python -m medlib.chat.red_flags")
        weights = load_file(str(weights_file))
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or min(2, os.cpu_count() or 1)
        options.inter_op_num_threads = 1
        names = list(weights)
        options.add_external_initializers(names, [ort.OrtValue.ortvalue_from_numpy(weights[n]) for n in names])
        session = ort.InferenceSession(str(graph_file), options, providers=["CPUExecutionProvider"])
        labels = json.loads(session.get_modelmeta().custom_metadata_map["labels"])
        tokenizer = Tokenizer.from_file(str(Path(resolve_model_path(MINILM)) / "tokenizer.json"))
        tokenizer.enable_truncation(max_length)
        tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
        return cls(session, tokenizer, labels["tiers"], labels["categories"])

    def probabilities(self, texts: Sequence[str], batch_size: int = 64) -> list[dict[str, dict[str, float]]]:
        """Per text {"tier": {tier: p}, "category": {category: p}}, as RedFlagClassifier.probabilities."""
        import numpy as np

        out: list[dict[str, dict[str, float]]] = []
        for start in range(0, len(texts), batch_size):
            encoded = self.tokenizer.encode_batch(list(texts[start:start + batch_size]))
            feed = {"input_ids": np.array([e.ids for e in encoded], dtype=np.int64),
                    "attention_mask": np.array([e.attention_mask for e in encoded], dtype=np.int64),
                    "token_type_ids": np.array([e.type_ids for e in encoded], dtype=np.int64)}
            tier_scores, category_scores = self.session.run(None, feed)  # log of the members' mean: softmax returns it
            for t, c in zip(_softmax(tier_scores), _softmax(category_scores)):
                out.append({"tier": dict(zip(self.tiers, map(float, t))), "category": dict(zip(self.categories, map(float, c)))})
        return out


def _softmax(logits: Any) -> Any:
    import numpy as np

    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)
