"""Record or check PNG hashes for a fixed set of tiny-model requests: what a refactor must not change.

    python scripts/golden_hashes.py record /tmp/golden.json   # before the change
    python scripts/golden_hashes.py check /tmp/golden.json    # after: exit 1 and the differing names if any

Hashes depend on the CPU's kernels (an AVX512 Xeon and an AVX2 EPYC differ in the last bits), so record and
check on the same machine, in one session; the file is not committed as a test oracle.
"""

from __future__ import annotations

import hashlib
import io
import json
import sys

PROMPT = "a large red circle at the top left and a small blue square at the bottom right on a white background"
LONG = ", ".join(["cinematic lighting", "(highly detailed:1.2)", "[blurry]", "film grain"] * 12) + ", " + PROMPT


def requests():
    base = dict(steps=6, seed=7)
    out = {f"sampler-{s}": dict(base, sampler=s) for s in ("euler", "euler_a", "heun", "dpmpp_2m", "ddim")}
    out.update({f"schedule-{s}": dict(base, schedule=s) for s in ("karras", "ddim")})
    out.update({f"long-{s}": dict(base, prompt=LONG, long_prompt=s) for s in ("chunk", "truncate", "window", "stretch")})
    out["batch-3"] = dict(base, batch_size=3, sampler="euler_a")
    out["clip-skip-2"] = dict(base, clip_skip=2)
    out["negative-guidance-3"] = dict(base, negative_prompt="green triangle", guidance=3.0)
    out["weighting-none"] = dict(base, prompt="(red:1.4) circle, [blue square]", weighting="none")
    out["break"] = dict(base, prompt="red circle BREAK blue square")
    out["size-96x64"] = dict(base, width=96, height=64)
    out["img2img"] = dict(base, init="euler", strength=0.6)
    out["img2img-heun"] = dict(base, init="euler", strength=0.3, sampler="heun")
    return out


def run() -> dict:
    from PIL.PngImagePlugin import PngInfo

    from clipdiffusion.pipeline import Pipeline

    pipe = Pipeline.default()
    hashes, first = {}, {}
    for name, req in requests().items():
        req = dict(req)
        prompt = req.pop("prompt", PROMPT)
        negative = req.pop("negative_prompt", "")
        init = req.pop("init", None)
        if init is not None:
            req["init_image"] = first[init]
        result = pipe.generate(prompt, negative, **req)
        first.setdefault(name.removeprefix("sampler-"), result.image)
        digest = hashlib.sha256()
        for image, text in zip(result.images, result.infotexts):
            info = PngInfo()
            info.add_text("parameters", text)
            buf = io.BytesIO()
            image.save(buf, format="PNG", pnginfo=info)
            digest.update(buf.getvalue())
        hashes[name] = digest.hexdigest()
    return hashes


def main(argv):
    if len(argv) != 2 or argv[0] not in ("record", "check"):
        print(__doc__)
        return 2
    hashes = run()
    if argv[0] == "record":
        with open(argv[1], "w") as f:
            json.dump(hashes, f, indent=1)
        print(f"recorded {len(hashes)} hashes in {argv[1]}")
        return 0
    with open(argv[1]) as f:
        want = json.load(f)
    bad = sorted(k for k in want if hashes.get(k) != want[k]) + sorted(set(hashes) - set(want))
    print(f"{len(want) - len(bad)}/{len(want)} identical" + (f"; differ: {', '.join(bad)}" if bad else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
