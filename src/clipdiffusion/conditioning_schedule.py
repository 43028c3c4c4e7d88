"""The prompt as sampling sees it: a request's prompt and negative prompt planned into schedules
(``text.schedule.plan_prompt``), every distinct text encoded once, the model-side conditionings the sampler's
``diffusion.scheduled.ScheduledCFGDenoiser`` picks from call by call, and the notes a generation reports.

Order (A1111 ``processing.py``): extra-network tags (``<lora:name:0.8>``) are taken out of the positive prompt
before anything is encoded, then the prompt is split on ``AND``, and each part becomes a schedule of texts; the
negative prompt is scheduled too, but neither split nor stripped (a tag there is text). ``<lora:...>`` tags are
applied by the pipeline (``clipdiffusion.lora``); any other tag is never silently dropped: it becomes a note
("<hypernet:x:1>: not applied: ..."), which
``GenerationResult.notes``, the CLI (stderr) and the server (``info``) report, in the planner's words
(``text.networks.network_info``, which the token report shows too). The infotext keeps the prompt
verbatim, tags and schedule syntax included, so a PNG's parameters reproduce the image.

**Timelines.** The schedules span ``schedule_steps(sampler, steps)`` (twice the steps for Heun), and the call
counter starts at 0 with the sampling run. txt2img: the run is the whole schedule. img2img: our img2img runs the
last ``int(steps * strength)`` steps (diffusers' arithmetic; A1111 runs t_enc + 1 = int(min(strength, 0.999) *
steps) + 1), so A1111's img2img step count is not reproduced, but its timeline rule is: the schedules span the
nominal ``steps`` (x2 for Heun) while the counter starts at 0 at the first step actually run. With steps 20 and
strength 0.5 (10 calls) ``[a:b:0.5]`` (``a`` up to counter 10) never switches, as in A1111 (11 calls there), and
``[a:b:5]`` switches at the 7th call.
"""

from __future__ import annotations

from dataclasses import dataclass

from .text.networks import network_info
from .text.schedule import PromptProgram, plan_prompt


def prompt_programs(request, total: int) -> tuple[PromptProgram, PromptProgram]:
    """The request's (prompt, negative prompt) programs over ``total`` schedule steps."""
    return plan_prompt(request.prompt, total), plan_prompt(request.negative_prompt, total, negative=True)


def network_note(network) -> str:
    """Why an extra-network tag of the prompt was not applied (the planner's status for it: the same words as
    the token report's)."""
    return f"{network.text}: {network_info(network)['status']}"


def prompt_notes(request) -> tuple[str, ...]:
    """What a generation of ``request`` reports about its prompt: one note per extra-network tag left unapplied
    (the planner's own note where it has one: an unknown kind, a multiplier that is not a number), then the
    planner's other notes, the negative prompt's included (the same for every batch of the request)."""
    from .diffusion.scheduled import schedule_steps

    program, negative = prompt_programs(request, schedule_steps(request.sampler, request.steps))
    tags = [network_note(n) for n in program.networks
            if not network_info(n)["applied"] and not any(note.startswith(n.text[:80]) for note in program.notes)]
    notes = [*tags, *program.notes, *negative.notes]
    first = program.parts[0][1][0][1]
    if request.attention_maps and (len(program.parts) > 1 or len(program.parts[0][1]) > 1):
        notes.append(f"attention maps: the tokens of {first!r} (the prompt's first text), on the calls that use it")
    return tuple(dict.fromkeys(notes))


@dataclass
class ScheduledConditioning:
    """The encoded program: ``conds``/``negative_conds`` text -> ``diffusion.scheduled.Cond`` (batch-expanded,
    on the model's device), ``parts`` [(weight, schedule)] and the ``negative`` schedule as the denoiser takes
    them, and the first text's ``plan`` for attention maps."""

    conds: dict
    negative_conds: dict
    parts: list
    negative: tuple
    first_text: str
    first_plan: object

    def denoiser(self, model, guidance: float, skip=None):
        from .diffusion.scheduled import ScheduledCFGDenoiser

        return ScheduledCFGDenoiser(model, self.conds, self.parts, self.negative, self.negative_conds, guidance,
                                    skip=skip)


def encode_request(text_encoder, request, *, batch: int, device, y_for=None, check=None) -> ScheduledConditioning:
    """Plan and encode ``request``'s prompts: every distinct text of the prompt's and the negative prompt's
    schedules through the text encoder once, in one batch. ``y_for(pooled [1,P] | None) -> y [B,adm] | None``
    builds the SDXL vector; ``check(stage, *tensors)`` checks the encoder's outputs for NaN/Inf."""
    from .diffusion.scheduled import Cond, schedule_steps

    program, negative = prompt_programs(request, schedule_steps(request.sampler, request.steps))
    if len(negative.parts) != 1:
        raise ValueError(f"a negative prompt program has one part, got {len(negative.parts)}")
    negative_schedule = negative.parts[0][1]
    encoded = text_encoder.encode_texts(program.texts(), [t for _, t in negative_schedule],
                                        clip_skip=request.clip_skip, long_prompt=request.long_prompt,
                                        weighting=request.weighting)
    if check is not None:
        every = [*encoded.prompts.values(), *encoded.negatives.values()]
        check("text encoder", *(e.context for e in every), *(e.pooled for e in every))

    def model_side(table):
        out = {}
        for text, e in table.items():
            context = e.context.to(device).float().expand(batch, -1, -1)  # [B,T,D]
            y = None if y_for is None else y_for(e.pooled)
            out[text] = Cond(context, None if y is None else y.to(device))
        return out

    parts = [(w, tuple(schedule)) for w, schedule in program.parts]
    first = parts[0][1][0][1]
    return ScheduledConditioning(model_side(encoded.prompts), model_side(encoded.negatives), parts,
                                 tuple(negative_schedule), first, encoded.prompts[first].plan)
