"""The embedding routes: ``GET /sdapi/v1/embeddings`` in A1111's shape, ``POST /sdapi/v1/refresh-embeddings``
rescanning the --embeddings folder, ``/api/tokenize`` counting embeddings as their vectors, and a generation whose
prompt names one (real tiny pipeline, so the embedding really reaches the text encoder)."""

import httpx
import pytest
import torch

from clipdiffusion.checkpoints.safetensors_io import save_file
from clipdiffusion.server.app import create_app
from clipdiffusion.server.settings import ServerSettings
from clipdiffusion.testing import tiny_pipeline

from server_fixtures import ServerThread

WIDTH = 32


def _kohya(folder, name, n, width=WIDTH, seed=0):
    vectors = torch.randn(n, width, generator=torch.Generator().manual_seed(seed))
    save_file({"emb_params": vectors}, folder / f"{name}.safetensors")


@pytest.fixture
def served(tmp_path):
    folder = tmp_path / "embeddings"
    folder.mkdir()
    _kohya(folder, "mystyle", 3)
    _kohya(folder, "sd1thing", 1, width=768)  # wrong width for the tiny model: skipped
    settings = ServerSettings(embeddings_dir=str(folder), samplers=("euler",), schedules=("normal",))
    loaded = []

    def factory(name):
        loaded.append(name)
        return tiny_pipeline(seed=1)

    with ServerThread(create_app(factory, settings)) as server, \
            httpx.Client(base_url=server.url, timeout=120) as client:
        yield client, folder, loaded


def test_embeddings_route_has_a1111_shape_and_refresh_rescans(served):
    client, folder, _ = served
    body = client.get("/sdapi/v1/embeddings").json()
    assert body["loaded"] == {"mystyle": {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None,
                                          "shape": WIDTH, "vectors": 3}}
    assert list(body["skipped"]) == ["sd1thing"]
    skipped = body["skipped"]["sd1thing"]
    assert skipped["shape"] == 768 and skipped["vectors"] == 1 and "32 wide" in skipped["reason"]
    assert client.post("/api/tokenize", json={"prompt": "a mystyle cat"}).json()["summary"] == "5/75"

    _kohya(folder, "newone", 2, seed=4)
    (folder / "mystyle.safetensors").unlink()
    refreshed = client.post("/sdapi/v1/refresh-embeddings")
    assert refreshed.status_code == 200
    body = client.get("/sdapi/v1/embeddings").json()
    assert list(body["loaded"]) == ["newone"] and body["loaded"]["newone"]["vectors"] == 2
    # the counter follows the refresh: mystyle is ordinary text now, newone counts 2
    report = client.post("/api/tokenize", json={"prompt": "newone mystyle"}).json()
    assert [e["name"] for e in report["embeddings"]] == ["newone"]
    assert report["total_tokens"] == 2 + len(client.post("/api/tokenize", json={"prompt": "mystyle"}).json()
                                             ["tokens"])


def test_tokenize_shows_the_embedding_as_one_unit(served):
    client, _, _ = served
    report = client.post("/api/tokenize", json={"prompt": "a (mystyle:1.2) cat"}).json()
    assert report["embeddings"] == [{"name": "mystyle", "vectors": 3, "chunk": 0, "position": 2}]
    texts = [t["text"] for t in report["tokens"]]
    assert texts[1:4] == ["mystyle ", "", ""] and [t["weight"] for t in report["tokens"][1:4]] == [1.2] * 3


@pytest.mark.slow  # one tiny generation through the server (~5 s on 2 shared cores)
def test_generation_through_the_server_uses_the_folder(served):
    client, _, loaded = served
    body = {"prompt": "mystyle", "negative_prompt": "mystyle", "steps": 1, "width": 16, "height": 16,
            "seed": 1, "sampler_name": "Euler"}
    response = client.post("/sdapi/v1/txt2img", json=body)
    assert response.status_code == 200, response.text
    assert loaded == ["clipdiffusion-tiny"]
