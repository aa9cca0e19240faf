"""jqlora against PyTorch (peft + bitsandbytes) only: ``compare_peers.py`` without qwix.

The same command line as ``compare_peers.py`` (``--quick``, ``--big``,
``--remat``, ...), the four stacks jqlora-qlora, jqlora-lora, peft-bnb and
peft-lora by default, written as ``compare_torch<suffix>.{json,md,png}``.

  python benchmarks/compare_torch.py --quick
"""

import compare_peers

if __name__ == "__main__":
  compare_peers.main(stem="compare_torch", default_stacks=compare_peers.STACKS[:4])
