"""Hub repo ids as checkpoint sources (fusesurgery.io.hub_sources), in process, against the fake
Hub: parsing, local paths winning, which files are fetched, revisions, offline, errors, and
remote headers read with range requests only."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from fusesurgery.errors import CheckpointError, HubError
from fusesurgery.io import open_checkpoint
from fusesurgery.io.hub_sources import (
    HubReference,
    parse_hub_reference,
    select_checkpoint_files,
)
from fusesurgery.reports.diff import diff_checkpoints
from fusesurgery.reports.inspection import inspect_checkpoint
from tests.hub.conftest import READ_TOKEN
from tests.hub_server import FakeHub
from tests.tiny_models import save_tiny_hf_decoder

TENSOR_GET_KINDS = (".safetensors", ".bin", ".onnx")


@pytest.fixture
def hub_settings(hub: FakeHub, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """This process pointed at the fake Hub through the environment, read at call time;
    returns the cache directory."""
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_TOKEN", READ_TOKEN)
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_hf_decoder("llama", tmp_path_factory.mktemp("llama") / "m")


def _data_gets(hub: FakeHub) -> list:
    return [r for r in hub.requests_of("resolve", "GET") if r.path.endswith(TENSOR_GET_KINDS)]


@pytest.mark.parametrize(("text", "expected"), [
    ("org/name", ("org/name", None)),
    ("meta-llama/Llama-3.1-8B@main", ("meta-llama/Llama-3.1-8B", "main")),
    ("org/name@refs/pr/3", ("org/name", "refs/pr/3")),
    ("org/name@" + "a" * 40, ("org/name", "a" * 40)),
    ("hf://org/name", ("org/name", None)),
    ("hf://org/name@v1.0", ("org/name", "v1.0")),
    ("hf://models/org/name@dev", ("org/name", "dev")),
    ("name", None),  # no namespace: a local path
    ("./org/name", None),
    ("/abs/org/name", None),
    ("org/name/extra", None),
    ("org/model.safetensors", None),  # a missing file, not a repo
    ("org/pytorch_model.bin", None),
    ("org--x/name", None),
    ("-org/name", None),
    ("org/name@", None),
])
def test_parse_hub_reference(text: str, expected):
    reference = parse_hub_reference(text)
    got = None if reference is None else (reference.repo_id, reference.revision)
    assert got == expected
    if reference is not None:
        assert reference.given == text


@pytest.mark.parametrize("text", ["hf://datasets/org/data", "hf://spaces/org/app",
                                  "hf://org/name/model.safetensors", "hf://"])
def test_hf_uris_that_are_not_model_repos(text: str):
    with pytest.raises(HubError, match="^hf://"):
        parse_hub_reference(text)


def test_select_checkpoint_files():
    repo = ["model.safetensors", "pytorch_model.bin", "model.onnx", "onnx/model.onnx",
            "flax_model.msgpack", "tf_model.h5", "model.gguf", "original/consolidated.00.pth",
            "original/params.json", "config.json", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json", "README.md", ".gitattributes", "training_args.bin",
            "preprocessor_config.json", "source/decoder/config.json", "source/decoder/x.bin"]
    selection = select_checkpoint_files(repo)
    assert selection.weights == ("model.safetensors",) and selection.safetensors
    assert set(selection.side_files) == {
        "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
        "preprocessor_config.json", "source/decoder/config.json"}
    sharded = select_checkpoint_files(["model.safetensors.index.json", "config.json",
                                       "model-00001-of-00002.safetensors"])
    assert sharded.index == "model.safetensors.index.json"
    pickles = select_checkpoint_files(["pytorch_model.bin", "training_args.bin", "x.onnx"])
    assert pickles.weights == ("pytorch_model.bin",) and not pickles.safetensors
    meta = select_checkpoint_files(["consolidated.00.pth", "consolidated.01.pth",
                                    "params.json", "tokenizer.model"])
    assert meta.weights == ("consolidated.00.pth", "consolidated.01.pth")
    assert set(meta.side_files) == {"params.json", "tokenizer.model"}
    with pytest.raises(HubError, match="holds no checkpoint"):
        select_checkpoint_files(["model.onnx", "model.gguf", "README.md"])


def test_download_fetches_only_what_the_checkpoint_needs(hub: FakeHub, seed_repo,
                                                         hub_settings: Path, llama_dir: Path,
                                                         tmp_path: Path):
    repo = tmp_path / "repo"
    shutil.copytree(llama_dir, repo)
    (repo / "pytorch_model.bin").write_bytes(b"\0" * 3_000_000)  # pickles beside safetensors
    (repo / "model.onnx").write_bytes(b"\0" * 1_000_000)
    (repo / "onnx").mkdir()
    (repo / "onnx" / "decoder.onnx").write_bytes(b"\0" * 1000)
    (repo / "tokenizer_config.json").write_text("{}")
    seed_repo("alice/llama", repo)
    hub.clear_log()

    with open_checkpoint("alice/llama") as source:
        assert source.hub is not None and source.hub.commit == hub.head("alice/llama")
        assert source.format == "safetensors" and len(source) > 0
        assert source.config["model_type"] == "llama"
        assert not source.hub.headers_only
        assert source.display_name == "alice/llama"
    fetched = sorted(r.path.rsplit("/", 1)[-1] for r in hub.requests_of("resolve", "GET"))
    assert fetched == ["config.json", "generation_config.json", "model.safetensors",
                       "tokenizer_config.json"]
    assert all(r.range is None for r in hub.requests_of("resolve", "GET"))


def test_local_path_wins(hub: FakeHub, seed_repo, hub_settings: Path, llama_dir: Path,
                         tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    seed_repo("alice/llama", llama_dir)
    shutil.copytree(llama_dir, tmp_path / "alice" / "llama")
    monkeypatch.chdir(tmp_path)
    hub.clear_log()
    with open_checkpoint("alice/llama") as source:
        assert source.hub is None and source.path == Path("alice/llama")
    assert hub.requests == []
    with pytest.raises(CheckpointError, match="no such file"):  # names no repo: as before
        open_checkpoint("alice/model.safetensors")


def test_revisions(hub: FakeHub, seed_repo, hub_settings: Path, llama_dir: Path,
                   tmp_path: Path):
    main = seed_repo("alice/m", llama_dir)
    qwen = save_tiny_hf_decoder("qwen2", tmp_path / "qwen")
    dev = seed_repo("alice/m", qwen, revision="dev")
    assert inspect_checkpoint("alice/m").model.family == "llama"
    assert inspect_checkpoint("alice/m@dev").model.family == "qwen2"
    assert inspect_checkpoint(f"hf://alice/m@{main}").model.family == "llama"
    with open_checkpoint("hf://models/alice/m@dev") as source:
        assert source.hub.commit == dev and source.hub.record() == {
            "repo_id": "alice/m", "revision": "dev", "commit": dev}
    with pytest.raises(HubError, match="has no revision 'nope'"):
        open_checkpoint("alice/m@nope")


def test_offline(hub: FakeHub, seed_repo, hub_settings: Path, llama_dir: Path,
                 monkeypatch: pytest.MonkeyPatch):
    seed_repo("alice/llama", llama_dir)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub.clear_log()
    with pytest.raises(HubError) as error:
        open_checkpoint("alice/llama")
    assert "no such local path, and no repo of that name in the local Hub cache" in str(error.value)
    assert "\n" not in str(error.value)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    with open_checkpoint("alice/llama") as online:
        online_keys = online.keys()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub.clear_log()
    with open_checkpoint("alice/llama") as offline:
        assert offline.keys() == online_keys and offline.hub.commit == hub.head("alice/llama")
    assert inspect_checkpoint("alice/llama").num_tensors == len(online_keys)
    assert hub.requests == []  # nothing asked of the Hub


def test_errors(hub: FakeHub, seed_repo, hub_settings: Path, llama_dir: Path,
                monkeypatch: pytest.MonkeyPatch):
    with pytest.raises(HubError) as error:
        open_checkpoint("alice/missing")
    message = str(error.value)
    assert "no model repo alice/missing" in message and "your token cannot see it" in message
    seed_repo("alice/private", llama_dir, private=True)
    assert inspect_checkpoint("alice/private").model.family == "llama"  # HF_TOKEN, read now
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(HubError, match="if it is private or gated, pass a token"):
        inspect_checkpoint("alice/private")
    seed_repo("alice/gated", llama_dir)
    hub.repos["alice/gated"].gated = True
    monkeypatch.setenv("HF_TOKEN", "hf_write_bob")
    with pytest.raises(HubError, match="a gated repo and your token has no access"):
        open_checkpoint("alice/gated")
    hub.fail("repo-info", status=None)  # the connection drops
    with pytest.raises(HubError, match="no such local path, and the Hub at http://127.0.0.1"):
        open_checkpoint("alice/private")


def test_remote_headers_read_no_tensor_bytes(hub: FakeHub, seed_repo, hub_settings: Path,
                                             tmp_path: Path):
    sharded = tmp_path / "sharded"
    import transformers

    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=64)).save_pretrained(sharded, max_shard_size="20KB")
    shards = sorted(p.name for p in sharded.glob("*.safetensors"))
    assert len(shards) > 2
    seed_repo("alice/sharded", sharded)
    hub.clear_log()

    report = inspect_checkpoint("alice/sharded")

    local = inspect_checkpoint(sharded)
    remote_view, local_view = report.to_dict(all_keys=True), local.to_dict(all_keys=True)
    for field in ("architecture", "config", "provenance", "keys", "components", "dtypes"):
        assert remote_view[field] == local_view[field], field
    assert (report.num_tensors, report.num_parameters, report.total_bytes) == (
        local.num_tensors, local.num_parameters, local.total_bytes)
    assert report.format == "safetensors-sharded" and report.path == "alice/sharded"
    gets = _data_gets(hub)
    assert sorted({r.path.rsplit("/", 1)[-1] for r in gets}) == shards
    for name in shards:  # exactly the length, then exactly the header
        length = int.from_bytes((sharded / name).read_bytes()[:8], "little")
        ranges = [(r.range, r.sent) for r in gets if r.path.endswith(name)]
        assert ranges == [("bytes=0-7", 8), (f"bytes=8-{7 + length}", length)]
    downloaded = {r.path.rsplit("/", 1)[-1] for r in hub.requests_of("resolve", "GET")
                  if r.range is None}
    assert downloaded == {"config.json", "model.safetensors.index.json"}

    hub.clear_log()
    diff = diff_checkpoints("alice/sharded", "hf://alice/sharded", values=None)
    assert diff.identical and not diff.values_compared
    assert all(r.range is not None for r in _data_gets(hub))
    # values asked for: downloaded, then compared
    hub.clear_log()
    assert diff_checkpoints("alice/sharded", sharded, values=True).identical
    assert {r.path.rsplit("/", 1)[-1] for r in _data_gets(hub) if r.range is None} == set(
        shards)


def test_fuse_records_hub_sources(hub: FakeHub, seed_repo, hub_settings: Path,
                                  llama_dir: Path, tmp_path: Path):
    import transformers

    from fusesurgery.surgery.fuse_plan import FuseOptions
    from fusesurgery.write.fuse_checkpoint import fuse_checkpoints
    from tests.tiny_models import TINY_VISION

    vision = tmp_path / "vision"
    transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**TINY_VISION)).save_pretrained(
        vision)
    seed_repo("fuse-org/vision", vision)
    dec_commit = seed_repo("alice/llama", llama_dir)
    fuse_checkpoints("hf://fuse-org/vision", "alice/llama@main", tmp_path / "out",
                     options=FuseOptions(every=1))
    sources = json.loads((tmp_path / "out" / "fusion_config.json").read_text())["sources"]
    assert sources["decoder"]["path"] == "alice/llama@main"
    assert sources["decoder"]["hub"] == {"repo_id": "alice/llama", "revision": "main",
                                         "commit": dec_commit}
    assert sources["encoder"]["path"] == "hf://fuse-org/vision"
    assert sources["encoder"]["hub"]["repo_id"] == "fuse-org/vision"
    assert HubReference("a/b", None, "a/b").display == "a/b"


def test_a_405b_shaped_repo_is_inspected_from_its_headers(hub: FakeHub, hub_settings: Path,
                                                          tmp_path: Path):
    """812 GB apparent (sparse shards served by range from disk): inspect reads a few hundred
    kB, every data request is a header range, and it says what the local copy says."""
    import json

    from fusesurgery.config import preset
    from fusesurgery.convert import layout_tensor_infos
    from fusesurgery.convert.configs import hf_config_dict
    from fusesurgery.testing import write_sparse_sharded_safetensors

    config = preset("llama3_1_405b")
    local = tmp_path / "big"
    write_sparse_sharded_safetensors(local, layout_tensor_infos(config, "hf"))
    (local / "config.json").write_text(json.dumps(hf_config_dict(config)))
    apparent = sum(p.stat().st_size for p in local.iterdir())
    hub.add_local_repo("alice/llama-405b", local)
    hub.clear_log()

    report = inspect_checkpoint("alice/llama-405b")

    assert report.num_parameters == inspect_checkpoint(local).num_parameters > 400e9
    sent = sum(r.sent for r in hub.requests)
    assert apparent > 800e9 and sent < 1e6
    assert all(r.range is not None for r in _data_gets(hub))


def test_remote_fused_repo_gates_are_read_by_range(hub: FakeHub, seed_repo, hub_settings: Path,
                                                   tmp_path: Path):
    """A fused repo's gates (scalars in the shard of new parameters) come by range requests
    of their own bytes: no shard is downloaded, and the values are the stored ones."""
    import fusesurgery

    root = Path(__file__).resolve().parents[2] / "examples"
    fused = tmp_path / "fused"
    fusesurgery.fuse(root / "tiny-clip-vision", root / "tiny-llama", fused, every=2)
    seed_repo("alice/fused", fused)
    hub.clear_log()

    report = inspect_checkpoint("alice/fused")

    assert report.fusion is not None and report.fusion.gates == \
        inspect_checkpoint(fused).fusion.gates
    assert len(report.fusion.gates) == 4 and report.fusion.is_identity
    gets = _data_gets(hub)
    assert gets and all(r.range is not None for r in gets)  # nothing downloaded whole
    assert max(r.sent for r in gets) < 20_000  # headers and 2-byte gate scalars only
