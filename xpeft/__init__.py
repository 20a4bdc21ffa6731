"""xpeft: X-PEFT profiles over one shared bank of frozen LoRA adapters.

Layers, each importing only those below it (a lint rule checks that the lower ones import no Ray and no
FastAPI): `config` → `core` (bank, masks, combine, layer, model, per-row forward; torch only) → `profiles`
(the record and the store) → `data`, `metrics` → `fit` (the one fit loop, warm starts, checkpoints) →
`ray` (cluster, farm, Ray Train, Ray Tune, report, jobs) and `serve` (engine, HTTP API, Serve deployment).
"""

__version__ = "0.2.0"
