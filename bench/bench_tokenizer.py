"""Tokenizer throughput: clipdiffusion's CLIPTokenizer vs open_clip's SimpleTokenizer on the same prompts.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_tokenizer.py [--reps 5] [--prompts 3000]

Workload (fixed seed): short prompts, long tag lists, a few non-ASCII prompts, and what a UI sends while the
user types (every prefix of a prompt, and the same prompt again). Both tokenizers encode the same list:

- cold: a fresh tokenizer (vocabulary loaded, caches empty), one pass;
- warm: a second pass on the same instance (open_clip keeps its own unbounded BPE cache too).

Repetitions interleave ours and the reference and the median is printed, since other jobs share the CPU. The
ids are compared for every prompt. Startup (a new Python process: import, construct, first encode) is timed
too; note that importing open_clip's tokenizer module imports torch.
"""

import argparse
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

TAGS = (
    "masterpiece, best quality, ultra detailed, 1girl, solo, long hair, looking at viewer, smile, blue eyes, "
    "outdoors, sky, cloud, cherry blossoms, kimono, city lights, night, neon, cyberpunk, rain, reflections, "
    "portrait, close-up, depth of field, bokeh, film grain, 35mm, photorealistic, 8k uhd, dslr, soft lighting, "
    "volumetric fog, god rays, cinematic, trending on artstation, by greg rutkowski, by alphonse mucha, oil "
    "painting, watercolor, concept art, matte painting, octane render, unreal engine, hyperrealistic, intricate, "
    "sharp focus, golden hour, dramatic lighting, rim light, highly detailed face, detailed eyes, red dress, "
    "white background, simple background, standing, sitting, from above, from below, wide shot, landscape, "
    "mountains, river, forest, castle, dragon, knight, armor, sword, magic, glowing, fantasy, sci-fi, spaceship"
).split(", ")
WEIGHTS = ["({}:1.2)", "(({}))", "[{}]", "({}:0.8)", "{}"]
NON_ASCII = ["café terrace", "日本の庭園", "ｆｕｌｌ ｗｉｄｔｈ", "naïve art", "✨ sparkles ✨", "Straße at night",
             "cafÃ© mojibake", "salt &amp; pepper"]


def _tags(rng, lo, hi):
    return ", ".join(rng.choice(WEIGHTS).format(rng.choice(TAGS)) for _ in range(rng.randint(lo, hi)))


def workload(n: int, seed: int = 0) -> list:
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        kind = rng.random()
        if kind < 0.35:
            out.append(_tags(rng, 3, 10))
        elif kind < 0.55:
            out.append(_tags(rng, 40, 120))
        elif kind < 0.6:
            out.append(_tags(rng, 3, 12) + ", " + rng.choice(NON_ASCII))
        else:  # typing: every 4th prefix of a prompt, then the full prompt resent a few times
            prompt = _tags(rng, 5, 25)
            out += [prompt[:i] for i in range(1, len(prompt), 4)] + [prompt] * 3
    return out[:n]


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def startup(code: str) -> float:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "tests"))
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, env=env, capture_output=True)
    return time.perf_counter() - start


def machine() -> str:
    model = platform.processor() or ""
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    import torch

    return (f"{model} | {os.cpu_count()} cpus | torch {torch.__version__} threads {torch.get_num_threads()} | "
            f"python {platform.python_version()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--prompts", type=int, default=3000)
    args = parser.parse_args()

    from refs import open_clip_module

    from clipdiffusion.text.tokenizer import CLIPTokenizer

    reference = open_clip_module("tokenizer")
    prompts = workload(args.prompts)
    chars = sum(map(len, prompts))
    print(f"machine: {machine()}")
    print(f"workload: {len(prompts)} prompts, {chars} characters, {len(set(prompts))} distinct")

    ours_tok = CLIPTokenizer()
    ours_ids = [ours_tok.encode(p) for p in prompts]
    ref_tok = reference.SimpleTokenizer()
    ref_ids = [ref_tok.encode(p) for p in prompts]
    same = sum(a == b for a, b in zip(ours_ids, ref_ids))
    print(f"identical ids: {same}/{len(prompts)}")

    results = {k: [] for k in ("ours cold", "ref cold", "ours warm", "ref warm")}
    for _ in range(args.reps):
        ours = CLIPTokenizer()
        ours.encode("x")  # load the vocabulary outside the timing; caches stay nearly empty
        ours._word_ids.cache_clear()
        ours._piece_ids.cache_clear()
        ref = reference.SimpleTokenizer()
        results["ours cold"].append(_time(lambda: [ours.encode(p) for p in prompts]))
        results["ref cold"].append(_time(lambda: [ref.encode(p) for p in prompts]))
        results["ours warm"].append(_time(lambda: [ours.encode(p) for p in prompts]))
        results["ref warm"].append(_time(lambda: [ref.encode(p) for p in prompts]))
    med = {k: statistics.median(v) for k, v in results.items()}
    for phase in ("cold", "warm"):
        o, r = med[f"ours {phase}"], med[f"ref {phase}"]
        print(f"{phase}: ours {len(prompts) / o:10.0f} prompts/s   open_clip {len(prompts) / r:10.0f} prompts/s   "
              f"ratio {r / o:5.1f}x")

    ours_code = ("from clipdiffusion.text.tokenizer import CLIPTokenizer; "
                 "CLIPTokenizer().encode('a photo of a cat')")
    ref_code = ("from refs import open_clip_module; "
                "open_clip_module('tokenizer').SimpleTokenizer().encode('a photo of a cat')")
    load = {"ours": [], "ref": []}
    for _ in range(args.reps):
        load["ours"].append(startup(ours_code))
        load["ref"].append(startup(ref_code))
    o, r = statistics.median(load["ours"]), statistics.median(load["ref"])
    print(f"startup (new process: import + construct + first encode): ours {o * 1e3:.0f} ms   "
          f"open_clip {r * 1e3:.0f} ms (imports torch)   ratio {r / o:.1f}x")
    from clipdiffusion.text import tokenizer as ours_module

    def ours_fresh():
        ours_module._load_vocab.cache_clear()  # instances share loaded tables; time a real load
        CLIPTokenizer().encode("a photo of a cat")

    o = statistics.median(_time(ours_fresh) for _ in range(args.reps))
    r = statistics.median(_time(lambda: reference.SimpleTokenizer().encode("a photo of a cat"))
                          for _ in range(args.reps))
    print(f"in-process construct + first encode: ours {o * 1e3:.1f} ms   open_clip {r * 1e3:.1f} ms   "
          f"ratio {r / o:.1f}x")
    o = statistics.median(_time(lambda: CLIPTokenizer().encode("a photo of a cat")) for _ in range(args.reps))
    print(f"in-process construct + first encode, another instance (shared tables): ours {o * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
