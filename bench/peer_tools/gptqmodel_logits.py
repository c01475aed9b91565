"""GPTQModel as the consumer of a neuqi ``gptq`` export: load it with GPTQModel's own
loader and torch kernel (fp16, its only CPU dtype), write the logits of the given token
ids and every layer's weight as GPTQModel de-quantizes it."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main() -> None:
    import gptqmodel
    import torch
    from gptqmodel import BACKEND, GPTQModel

    export, ids_path, out = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    model = GPTQModel.load(str(export), device="cpu", backend=BACKEND.GPTQ_TORCH, dtype=torch.float16)
    ids = torch.load(ids_path)
    with torch.no_grad():
        logits = model.model(input_ids=ids).logits.float()
    kernels = sorted({type(m).__name__ for m in model.model.modules() if hasattr(m, "qweight")})
    weights = {name: m.dequantize_weight().T.float().cpu() for name, m in model.model.named_modules()
               if hasattr(m, "qweight") and hasattr(m, "dequantize_weight")}
    torch.save({"logits": logits, "weights": weights}, out)
    print(json.dumps({"gptqmodel": gptqmodel.__version__, "torch": torch.__version__, "kernels": kernels}))


if __name__ == "__main__":
    main()
