"""The worked LoRA example (issue 17): the shipped ``examples/loras/purple.safetensors`` on the embedded tiny model,
and ``scripts/make_example_lora.py``'s training on a tiny random pipeline."""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "examples" / "loras" / "purple.safetensors"
PROMPT = "a large red circle at the top left on a black background"


def _script():
    name = "make_example_lora"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / "make_example_lora.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses resolve their module while the file executes
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: extra threads only wait for each other on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def default_pipe():
    from clipdiffusion import Pipeline

    return Pipeline.default()


def test_shipped_file_is_small_kohya_and_names_every_attention_module(default_pipe):
    from clipdiffusion.checkpoints.lora import map_lora, read_lora

    m = _script()
    assert SHIPPED.stat().st_size < 200_000
    lora = read_lora(SHIPPED)
    assert lora.layout == "kohya"
    assert lora.metadata["ss_output_name"] == "purple"
    modules = [path for path, _ in m.target_modules(default_pipe.unet)]
    expected = set(m.kohya_names(default_pipe.unet, modules).values())
    assert set(lora.modules) == expected
    assert len(expected) == 4 * 10  # four transformer blocks, ten targets each
    assert {mod.rank for mod in lora.modules.values()} == {int(lora.metadata["ss_network_dim"])}
    mapped = map_lora(lora, default_pipe._lora_engine().targets(default_pipe))
    assert {param for _, param in mapped} == {f"{p}.weight" for p in modules}
    # trained: every up factor moved away from its zero initialisation
    assert all(float(mod.up.abs().max()) > 0 for mod in lora.modules.values())


def test_shipped_lora_turns_the_object_purple_and_is_removed_bit_for_bit(default_pipe):
    from clipdiffusion.tiny.judge import judge

    pipe = default_pipe
    pipe.load_lora(SHIPPED)
    weights = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    gen = {"seed": 0, "steps": 12}
    before = pipe.generate(PROMPT, **gen)
    purple = pipe.generate(PROMPT + " <lora:purple:1>", **gen)
    after = pipe.generate(PROMPT, **gen)
    zero = pipe.generate(PROMPT + " <lora:purple:0>", **gen)
    assert np.array_equal(np.asarray(after.image), np.asarray(before.image))
    assert np.array_equal(np.asarray(zero.image), np.asarray(before.image))
    assert all(torch.equal(v, weights[k]) for k, v in pipe.unet.state_dict().items())
    assert not np.array_equal(np.asarray(purple.image), np.asarray(before.image))
    seen_before, seen_purple = judge(before.image).at(0), judge(purple.image).at(0)
    assert seen_before is not None and seen_before.color == "red"
    assert seen_purple is not None and seen_purple.color == "purple" and seen_purple.shape == "circle"
    assert "Lora hashes" in purple.infotexts[0] and "Lora hashes" not in before.infotexts[0]


def test_training_step_on_a_tiny_random_pipeline(tmp_path):
    from clipdiffusion.checkpoints.lora import read_lora
    from clipdiffusion.testing import tiny_pipeline

    m = _script()
    pipe = tiny_pipeline(seed=2)
    before = m.state_fingerprint(pipe)
    settings = m.LoraSettings(steps=3, rank=2, alpha=1.0, lr=1e-2, batch_size=2, scenes=6, seed=5, time_limit=None)
    logged = []
    trained = m.train(pipe, settings, log=lambda *a: logged.append(a), log_every=1)
    assert trained.steps == 3 and len(trained.losses) == 3 and all(np.isfinite(trained.losses))
    assert [step for step, _, _ in logged] == [1, 2, 3]
    after = m.state_fingerprint(pipe)
    assert all(torch.equal(before[k], after[k]) for k in before)  # the base stays frozen
    assert all(float(up.detach().abs().max()) > 0 for up in trained.hooks.up)  # the factors learned
    # the hooks change the UNet's output while attached, and nothing once removed
    x, t = torch.randn(1, 4, 16, 16), torch.tensor([500])
    context = pipe.text_encoder.encode("a red circle at the top").context
    with torch.no_grad():
        plain = pipe.unet(x, t, context)
        with trained.hooks.attached():
            hooked = pipe.unet(x, t, context)
        assert torch.equal(pipe.unet(x, t, context), plain)
    assert float((hooked - plain).abs().max()) > 0
    path = tmp_path / "tiny-purple.safetensors"
    m.save_lora(path, trained, pipe, threads=1)
    lora = read_lora(path)
    assert lora.metadata["ss_output_name"] == "purple" and lora.metadata["ss_steps"] == "3"
    assert {mod.alpha for mod in lora.modules.values()} == {1.0}
    assert len(lora.modules) == len(m.target_modules(pipe.unet))
    # Pipeline.load_lora merges it; the merged UNet reproduces the training-time hook forward
    assert m.merged_vs_hooks(pipe, trained.hooks, path, name="tiny-purple") < 1e-5
    assert all(torch.equal(before[k], v) for k, v in m.state_fingerprint(pipe).items())  # restored after


def test_same_seed_same_factors():
    from clipdiffusion.testing import tiny_pipeline

    m = _script()
    settings = m.LoraSettings(steps=2, rank=2, batch_size=2, scenes=4, seed=9, time_limit=None)
    a = m.train(tiny_pipeline(seed=1), settings).hooks.kohya_tensors(tiny_pipeline(seed=1).unet)
    b = m.train(tiny_pipeline(seed=1), settings).hooks.kohya_tensors(tiny_pipeline(seed=1).unet)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_purple_examples_recolour_objects_and_keep_the_sampled_captions():
    from clipdiffusion.tiny.captions import parse_caption
    from clipdiffusion.tiny.judge import judge

    m = _script()
    examples = m.purple_examples(12, seed=4, canvas=64)
    asked = []
    for image, text in examples:
        spec = parse_caption(text)
        seen = judge(image)
        for o in spec.objects:
            found = seen.at(o.cell)
            assert found is not None and found.color == "purple" and found.shape == o.shape
            asked.append(o.color)
    assert len(set(asked)) >= 3  # the captions keep the colours the scenes were sampled with
