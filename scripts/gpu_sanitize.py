"""One call of each CUDA C++ kernel (gather_tokens / pad_scatter, both layouts), for
`compute-sanitizer --tool memcheck` (scripts/gpu_check.sh): valid indices, then bad ones — with
``check_index=True`` the call must raise the documented ValueError, with ``check_index=False`` it
must neither raise nor write through the bad entries (memcheck reports any out-of-bounds access).
Exit status 0 when every expectation held."""
import sys

import torch

import fasttrack
from fasttrack import reference


def main() -> int:
    dev, g = "cuda", torch.Generator().manual_seed(0)
    B, L, k, C, hw = 2, 256, 89, 768, (16, 16)
    index = torch.stack([torch.randperm(L, generator=g)[:k] for _ in range(B)])
    kept = torch.randn(B, k, C, generator=g)
    failures = []
    for layout, extra in (("tokens", ()), ("nchw", hw)):
        out = fasttrack.pad_scatter(kept.to(dev), index.to(dev), L, layout, extra)
        want = reference.pad_scatter(kept, index, L, layout, list(extra))
        if not torch.equal(out.cpu(), want):
            failures.append(f"pad_scatter {layout}: differs from the reference")
        back = fasttrack.gather_tokens(out, index.to(dev), layout)
        if not torch.equal(back.cpu(), kept):
            failures.append(f"gather_tokens {layout}: differs from the kept tokens")
        for bad_value in (L, -1, 10**12):
            bad = index.clone()
            bad[1, 5] = bad_value
            try:
                fasttrack.pad_scatter(kept.to(dev), bad.to(dev), L, layout, extra)
                failures.append(f"pad_scatter {layout} index {bad_value}: no error with check_index=True")
            except ValueError:
                pass
            try:
                fasttrack.gather_tokens(out, bad.to(dev), layout)
                failures.append(f"gather_tokens {layout} index {bad_value}: no error with check_index=True")
            except ValueError:
                pass
            fasttrack.pad_scatter(kept.to(dev), bad.to(dev), L, layout, extra, check_index=False)
            fasttrack.gather_tokens(out, bad.to(dev), layout, check_index=False)
    torch.cuda.synchronize()
    print("\n".join(failures) or "gather_tokens / pad_scatter: every expectation held")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
