"""memit_fast imports and edits on the CPU without its optional packages: Triton (declared for
Linux only), datasets, matplotlib, peft. Run in a subprocess where importing them fails."""

import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent

SCRIPT = """
import sys
for name in ("triton", "datasets", "matplotlib", "peft"):
    sys.modules[name] = None  # `import name` raises ImportError
import torch, tiny, memit_fast
from memit_fast.kernels._triton import HAVE_TRITON
assert not HAVE_TRITON
m = tiny.model("llama", dtype=torch.float32)
hp = tiny.hparams(m)
stats = tiny.stats(m, hp)
before = m.model.layers[3].mlp.down_proj.weight.clone()
_, orig = memit_fast.apply(m, tiny.tokenizer(), tiny.REQUESTS, hp, stats=stats, context_templates=tiny.TEMPLATES, progress=False)
assert not torch.equal(m.model.layers[3].mlp.down_proj.weight, before)
memit_fast.restore(m, orig)
assert torch.equal(m.model.layers[3].mlp.down_proj.weight, before)
print("ok")
"""


def test_edit_without_optional_packages():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, cwd=TESTS, timeout=600,
                         env={**__import__("os").environ, "PYTHONPATH": f"{TESTS}:{TESTS.parent}"})
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]
