"""The peer baseline of benchmarks/serve_load.py's load stage: the same profiles as PEFT LoRA adapters, one per profile,
served the way Ray Serve documents many models (`@serve.multiplexed`, docs.ray.io "Model Multiplexing").

- `write_adapters`: the first n profiles of an xpeft store as PEFT adapters on disk: r = b on the value
  projection (lora_A = Â, lora_B = B̂ of each block, lora_alpha = r so the scale is 1) and the profile's
  linear head beside it (`head.safetensors`). A LoRA has no LayerNorm between A and B, so the scores differ
  from the xpeft profile's; the cost of a forward is the same.
- `peer_app`: one deployment whose `@serve.multiplexed(max_num_models_per_replica=M)` loader loads a
  profile's adapter from disk into one shared PeftModel (`load_adapter`; `delete_adapter` when the LRU evicts
  it) on a miss, and whose `@serve.batch` (counting texts, as xpeft's max_batch_size does) batches the
  requests for one model: Serve splits batches by multiplexed model id, so rows of different profiles never
  share a forward. The client names the model in the `serve_multiplexed_model_id` header.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from xpeft.core.encoder import load_encoder, load_tokenizer
from xpeft.core.head import head_forward

TARGET_MODULE = "value"  # attention.self.value: the module xpeft's bank adapts (DEFAULT_TARGET)
MODEL_ID_HEADER = "serve_multiplexed_model_id"


def lora_config(r: int):
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=r, lora_dropout=0.0, target_modules=[TARGET_MODULE], bias="none")


def write_adapters(store, root: str, n: int, backbone: str) -> list[str]:
    """The first `n` profiles of `store` as PEFT adapter directories under `root` (kept and reused when all
    are there); returns their ids."""
    from peft import get_peft_model, get_peft_model_state_dict

    from xpeft.serve.combine import combine_profiles

    ids = store.ids()[:n]
    done = Path(root, "DONE")
    if done.exists() and done.read_text().split() == ids:
        return ids
    bank = store.load_bank(store.bank_fingerprints()[0])
    model = get_peft_model(load_encoder(backbone), lora_config(bank.b))
    keys = get_peft_model_state_dict(model)  # names as load_adapter wants them (no adapter name)
    a_keys = sorted((k for k in keys if "lora_A" in k), key=_layer)
    b_keys = sorted((k for k in keys if "lora_B" in k), key=_layer)
    config = model.peft_config["default"]
    for start in range(0, len(ids), 64):
        profiles = [store.get(i) for i in ids[start : start + 64]]
        for p, c in zip(profiles, combine_profiles(profiles, bank, bank.d_in, {}), strict=True):
            if isinstance(c, Exception):
                raise c
            out = Path(root, p.profile_id)
            out.mkdir(parents=True, exist_ok=True)
            state = {k: c.A_hat[i].contiguous() for i, k in enumerate(a_keys)}
            state |= {k: c.B_hat[i].contiguous() for i, k in enumerate(b_keys)}
            save_file(state, str(out / "adapter_model.safetensors"))
            config.save_pretrained(str(out))
            save_file({k: v.contiguous() for k, v in c.head.tensors.items()}, str(out / "head.safetensors"))
    done.write_text("\n".join(ids))
    return ids


def _layer(key: str) -> int:
    """The block number in a PEFT key '...encoder.layer.<i>.attention.self.value.lora_A.weight'."""
    parts = key.split(".")
    return int(parts[parts.index("layer") + 1])


class _Loaded:
    """One multiplexed model: an adapter loaded into the shared PeftModel, and its head. Serve calls
    `__del__` when its LRU evicts it (and Python may again at collection: the flag makes that a no-op)."""

    def __init__(self, server, name: str, head: dict[str, torch.Tensor]):
        self.server, self.name, self.head = server, name, head
        self.deleted = False

    def __del__(self):
        if not self.deleted:
            self.deleted = True
            with self.server.lock:
                self.server.model.delete_adapter(self.name)


def peer_app(adapters_dir: str, backbone: str, max_models: int, num_cpus: float, max_batch_size: int = 32):
    """The Serve application (one replica) of the PEFT + multiplexing peer."""
    from peft import get_peft_model
    from ray import serve
    from starlette.requests import Request

    @serve.deployment(max_ongoing_requests=64, ray_actor_options={"num_cpus": num_cpus})
    class PeftMultiplexed:
        def __init__(self):
            torch.set_num_threads(max(1, int(num_cpus)))
            self.tokenizer = load_tokenizer(backbone)
            r = json.loads(Path(adapters_dir, os.listdir(adapters_dir)[0], "adapter_config.json").read_text())["r"]
            # One base model; "default" is a placeholder adapter that no request uses.
            self.model = get_peft_model(load_encoder(backbone), lora_config(r)).eval()
            self.lock = threading.Lock()  # set_adapter + forward, load and delete: one at a time
            self.stats = {
                "loads": 0,
                "load_seconds": 0.0,
                "reloads": 0,
                "batches": 0,
                "rows": 0,
                "forward_seconds": 0.0,
            }

        @serve.multiplexed(max_num_models_per_replica=max_models)
        async def get_model(self, profile_id: str) -> _Loaded:
            import asyncio

            return await asyncio.to_thread(self._load, profile_id)

        def _load(self, profile_id: str) -> _Loaded:
            start = time.perf_counter()
            path = Path(adapters_dir, profile_id)
            head = load_file(str(path / "head.safetensors"))
            with self.lock:
                self.model.load_adapter(str(path), adapter_name=profile_id)
            self.stats["loads"] += 1
            self.stats["load_seconds"] += time.perf_counter() - start
            return _Loaded(self, profile_id, head)

        @serve.batch(max_batch_size=max_batch_size, batch_wait_timeout_s=0.01, batch_size_fn=lambda b: sum(map(len, b)))
        async def classify(self, requests: list[list[str]]) -> list[list[dict]]:
            import asyncio

            loaded = await self.get_model(serve.get_multiplexed_model_id())
            texts = [t for r in requests for t in r]
            probs = await asyncio.to_thread(self._forward, loaded, texts)
            out, i = [], 0
            for r in requests:
                out.append([{"label": int(p.argmax()), "probabilities": p.tolist()} for p in probs[i : i + len(r)]])
                i += len(r)
            return out

        @torch.no_grad()
        def _forward(self, loaded: _Loaded, texts: list[str]) -> torch.Tensor:
            tokens = self.tokenizer(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
            with self.lock:
                start = time.perf_counter()
                if loaded.deleted:  # the LRU evicted it while this batch waited: load it again (GC deletes it)
                    self.model.load_adapter(str(Path(adapters_dir, loaded.name)), adapter_name=loaded.name)
                    loaded.deleted = False
                    self.stats["reloads"] += 1
                self.model.set_adapter(loaded.name)
                hidden = self.model(**tokens).last_hidden_state
                self.stats["batches"] += 1
                self.stats["rows"] += len(texts)
                self.stats["forward_seconds"] += time.perf_counter() - start
            return torch.softmax(head_forward("linear", loaded.head, hidden, tokens["attention_mask"]), -1)

        async def __call__(self, request: Request) -> dict:
            if request.url.path.endswith("/healthz"):
                return {"status": "ok", "pid": os.getpid(), **self.stats}
            body = await request.json()
            return {"profile_id": body["profile_id"], "predictions": await self.classify(body["texts"])}

    return PeftMultiplexed.bind()
