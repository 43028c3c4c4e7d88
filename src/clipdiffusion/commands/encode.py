"""``clipdiffusion encode``: a prompt (and negative prompt) to a conditioning tensor file.

The output is a safetensors file with ``context`` and ``negative_context`` [1, T, D], plus ``pooled`` and
``negative_pooled`` [1, P] for SDXL, and in its metadata the token report (JSON) and the settings used, so a file
says how it was made. ``safetensors.torch.load_file`` reads it; for diffusers pass the tensors as
``prompt_embeds``/``negative_prompt_embeds`` (and ``pooled_prompt_embeds``/``negative_pooled_prompt_embeds``).
"""

import json
import sys

from ..text.chunking import LONG_PROMPT_STRATEGIES

# conditioning.WEIGHTINGS' names, repeated so that building the parser does not import torch (a test keeps them equal)
WEIGHTING_NAMES = ["a1111", "comfy", "none", "ignore"]


def add_arguments(parser) -> None:
    parser.add_argument("prompt", help="the prompt (A1111 syntax: (word:1.2), [word], BREAK)")
    parser.add_argument("--text-encoder", required=True, metavar="FILE",
                        help="checkpoint or text-encoder .safetensors (SD1/SD2/SDXL single file, HF, OpenCLIP)")
    parser.add_argument("--negative", default="", metavar="TEXT", help="negative prompt (default: empty)")
    parser.add_argument("--clip-skip", type=int, default=None, metavar="N",
                        help="1 = last layer, 2 = penultimate (A1111 counting; ComfyUI -n); "
                             "default: the family's (SD1 1, SD2/SDXL 2)")
    parser.add_argument("--long-prompt", default="chunk", choices=list(LONG_PROMPT_STRATEGIES),
                        help="how prompts over 75 tokens are handled (default: chunk, as A1111)")
    parser.add_argument("--weighting", default="a1111", choices=WEIGHTING_NAMES,
                        help="how (word:1.2) weights act (default: a1111)")
    parser.add_argument("--chunk-backtrack", type=int, default=20, metavar="N",
                        help="chunk: move text after a comma within the last N tokens to the next chunk (0: off)")
    parser.add_argument("--window-stride", type=int, default=60, metavar="N",
                        help="window: tokens between window starts (75 - overlap)")
    parser.add_argument("--no-equalize", action="store_true",
                        help="leave prompt and negative at their own lengths (no empty-prompt padding)")
    parser.add_argument("-o", "--output", required=True, metavar="OUT.safetensors", help="file to write")
    parser.add_argument("--embeddings", metavar="DIR",
                        help="a folder of textual-inversion embeddings (.pt .bin .safetensors); each file's stem "
                             "in the prompt stands for its vectors")


def _describe(name, report) -> list:
    lines = [f"{name}: {report.total_tokens} tokens in {len(report.chunks)} window(s): {report.summary()}"]
    lines += [f"  note: {note}" for note in report.notes]
    return lines


def run(args) -> int:
    from ..checkpoints.safetensors_io import save_file
    from ..checkpoints.text_encoders import load_text_encoder
    from ..fileio import check_output

    # Before the encoder loads: a folder, a device or a missing folder as --output fails now, not after the work.
    # save_file writes through a temporary file renamed onto the target, so a failed write keeps an old file.
    target = check_output(args.output, "output")
    if args.embeddings is not None:
        from ..checkpoints.embeddings import scan_folder

        scan_folder(args.embeddings)  # a missing folder fails before the encoder loads
    encoder = load_text_encoder(args.text_encoder)
    if args.embeddings is not None:
        from ..checkpoints.embeddings import describe_report, load_folder

        report = load_folder(args.embeddings, encoder)
        for embedding in report.loaded:
            encoder.add_embedding(embedding)
        for line in describe_report(report):
            print(line, file=sys.stderr)
    cond = encoder.encode(
        args.prompt,
        args.negative,
        clip_skip=args.clip_skip,
        long_prompt=args.long_prompt,
        weighting=args.weighting,
        chunk_backtrack=args.chunk_backtrack,
        window_stride=args.window_stride,
        equalize=not args.no_equalize,
    )
    tensors = {"context": cond.context, "negative_context": cond.negative_context}
    if cond.pooled is not None:
        tensors.update(pooled=cond.pooled, negative_pooled=cond.negative_pooled)
    settings = {
        "family": encoder.family,
        "clip_skip": args.clip_skip,
        "long_prompt": args.long_prompt,
        "weighting": args.weighting,
        "chunk_backtrack": args.chunk_backtrack,
        "window_stride": args.window_stride,
        "equalize": not args.no_equalize,
        "context_lengths": list(cond.context_lengths),
    }
    metadata = {
        "prompt": args.prompt,
        "negative_prompt": args.negative,
        "settings": json.dumps(settings),
        "report": json.dumps(cond.report.to_dict()),
    }
    save_file({k: v.contiguous() for k, v in tensors.items()}, target, metadata=metadata)
    lines = _describe("prompt", cond.report.prompt) + _describe("negative", cond.report.negative_prompt)
    lines += [f"note: {note}" for note in cond.report.notes]
    shapes = ", ".join(f"{k} {list(v.shape)}" for k, v in tensors.items())
    lines.append(f"wrote {args.output}: {shapes}")
    print("\n".join(lines))
    return 0
