"""The serving encoder as one ONNX graph: exported once per backbone, kept in a cache directory, verified when
it is loaded.

The graph takes the per-row adapters as inputs, so one `InferenceSession.run` serves a batch that mixes
x_peft rows (with or without LN), single_adapter rows and head_only rows, for any number of rows R and
tokens T:

    <token inputs>  int64 [R, T]           the tokenizer's: input_ids, attention_mask (, token_type_ids)
    A_hat           float32 [R, L, b, d_in]   zeros for head_only rows
    B_hat           float32 [R, L, d_out, b]  the LoRA scale folded in; zeros for head_only rows
    ln_weight       float32 [R, L, b]         anything (ones) where use_ln is false
    ln_bias         float32 [R, L, b]
    use_ln          bool [R]                  LayerNorm after Âx for this row
    -> last_hidden_state float32 [R, T, d]

The graph is `xpeft.core.multiprofile.MultiProfileModel.encode_rows`, the eager forward's own per-row encoder
(each block's target linear an `AdaptedLinear` with a per-row `Adapter`, `ln_rows` switching LN per row),
traced by torch's TorchScript exporter (2-3 s for MiniLM, against
13-50 s for the dynamo exporter, and a slightly faster graph: /work/scratch/onnx/REPORT.md). The file is
named by a key over everything the graph depends on (the encoder's config and class, a sha256 of its
weights, target, b, token inputs, opset, torch and transformers versions), and a sidecar JSON records the
file's sha256, checked on every load; a replica that finds a valid graph loads it without exporting.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from xpeft.core.multiprofile import ROW_INPUTS, MultiProfileModel

log = logging.getLogger(__name__)

FORMAT_VERSION = 1  # bump when the graph's inputs or the adapter formula change
OPSET = 18
ADAPTER_INPUTS = ROW_INPUTS  # the per-row adapters, as `RowAdapters.gather` stacks them
OUTPUT = "last_hidden_state"


def default_cache_dir() -> Path:
    """$XPEFT_ONNX_CACHE, else $XDG_CACHE_HOME/xpeft/onnx, else ~/.cache/xpeft/onnx."""
    root = os.environ.get("XPEFT_ONNX_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "xpeft", "onnx"
    )
    return Path(root)


def weights_fingerprint(encoder: nn.Module) -> str:
    """sha256 over every parameter and buffer (name, dtype, shape, bytes); names as in the unwrapped encoder,
    so an encoder whose linears xpeft already wrapped keys the same as a fresh one."""
    h = hashlib.sha256()
    state = {k.replace(".base.", "."): v for k, v in encoder.state_dict().items()}
    for name, t in sorted(state.items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def graph_key(encoder: nn.Module, target: str, b: int, token_names: tuple[str, ...]) -> tuple[str, dict]:
    """(key, what it covers): a graph is reused only for the same encoder, target, b and token inputs, and
    the same exporter versions."""
    import transformers

    config = encoder.config.to_dict()
    for k in ("_name_or_path", "transformers_version", "torch_dtype", "dtype", "_attn_implementation"):
        config.pop(k, None)
    meta = {
        "format": FORMAT_VERSION,
        "class": type(encoder).__name__,
        "config": config,
        "weights": weights_fingerprint(encoder),
        "target": target,
        "b": b,
        "token_inputs": list(token_names),
        "opset": OPSET,
        "exporter": "torchscript",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    return hashlib.sha256(json.dumps(meta, sort_keys=True, default=str).encode()).hexdigest()[:24], meta


class _Exportable(nn.Module):
    """`MultiProfileModel.encode_rows` with its inputs as positional tensors: what the graph computes."""

    def __init__(self, encoder: nn.Module, target: str, token_names: tuple[str, ...]):
        super().__init__()
        self.model = MultiProfileModel(encoder, target)
        self.token_names = token_names

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        n = len(self.token_names)
        return self.model.encode_rows(dict(zip(self.token_names, inputs[:n], strict=True)), *inputs[n:])


def _eager_copy(encoder: nn.Module) -> nn.Module:
    """A float32 CPU copy in eval mode with eager attention: traced into plain MatMul/Softmax nodes."""
    enc = copy.deepcopy(encoder).cpu().float().eval()
    for p in enc.parameters():
        p.requires_grad_(False)
    try:
        enc.set_attn_implementation("eager")
    except (AttributeError, ValueError):  # older transformers, or a model without the switch
        enc.config._attn_implementation = "eager"
    return enc


def export_graph(encoder: nn.Module, target: str, b: int, token_names: tuple[str, ...], path: Path) -> None:
    """Write the graph to `path` atomically (a temp file, then a rename: replicas sharing a cache never read
    half a file)."""
    model = _Exportable(_eager_copy(encoder), target, token_names).eval()
    lin = model.model.adapted[0]
    L, d_in, d_out = len(model.model.adapted), lin.in_features, lin.out_features
    R, T = 2, 7
    tokens = [torch.ones(R, T, dtype=torch.long) if n != "token_type_ids" else torch.zeros(R, T, dtype=torch.long)
              for n in token_names]  # fmt: skip
    example = (
        *tokens,
        torch.randn(R, L, b, d_in) * 0.02,
        torch.randn(R, L, d_out, b) * 0.02,
        torch.ones(R, L, b),
        torch.zeros(R, L, b),
        torch.tensor([True, False]),
    )
    names = [*token_names, *ADAPTER_INPUTS]
    axes = {n: {0: "R", 1: "T"} for n in token_names} | {n: {0: "R"} for n in ADAPTER_INPUTS}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    with torch.no_grad(), warnings.catch_warnings():
        # The tracer warns where it turns a size into a constant (b, and transformers' mask-length branch, which
        # holds whenever the mask is as long as the sequence, as the engine's always is): both are right here.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        # ... and it warns that aten::index would be wrong for negative indices: the graph has none.
        warnings.filterwarnings("ignore", message="Exporting aten::index operator")
        torch.onnx.export(
            model,
            example,
            str(tmp),
            input_names=names,
            output_names=[OUTPUT],
            dynamic_axes=axes | {OUTPUT: {0: "R", 1: "T"}},
            opset_version=OPSET,
            dynamo=False,
            do_constant_folding=True,
        )
    os.replace(tmp, path)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def cached_graph(
    encoder: nn.Module, target: str, b: int, token_names: tuple[str, ...], cache_dir: str | os.PathLike | None
) -> tuple[Path, bool]:
    """The graph's file, from the cache when a verified copy is there, else exported (and cached); and
    whether it was exported now."""
    key, meta = graph_key(encoder, target, b, token_names)
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    path = root / f"{type(encoder).__name__}-b{b}-{key}.onnx"
    sidecar = path.with_suffix(".json")
    if path.exists() and sidecar.exists():
        try:
            recorded = json.loads(sidecar.read_text())
        except ValueError:
            recorded = {}
        if recorded.get("key") == key and recorded.get("sha256") == file_sha256(path):
            log.info("encoder graph for b=%d loaded from %s", b, path)
            return path, False
        log.warning(
            "cached encoder graph %s does not match its record %s (damaged?); exporting it again", path, sidecar
        )
    start = time.perf_counter()
    export_graph(encoder, target, b, token_names, path)
    record = {"key": key, "sha256": file_sha256(path), "bytes": path.stat().st_size, "meta": meta}
    tmp = sidecar.with_name(f"{sidecar.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(record, indent=1, default=str))
    os.replace(tmp, sidecar)
    log.info("encoder graph for b=%d exported to %s in %.1f s", b, path, time.perf_counter() - start)
    return path, True


def open_session(graph: Path, threads: int):
    """An ONNX Runtime CPU session for the graph, tuned for a replica that shares its cores."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # Idle pool threads must not spin on a core the proxy and the event loops need (1.1-2.1x slower at 2
    # threads on 2 shared cores), and activations are freed after each run instead of kept in an arena that
    # grows to the largest batch seen (+150 MB RSS per 32 x 100-token run; <= 3 % slower without it).
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.enable_cpu_mem_arena = False
    return ort.InferenceSession(str(graph), so, providers=["CPUExecutionProvider"])
