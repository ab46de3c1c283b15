"""fuse at copy speed (issue 19, section 3): the source files that become shards start copying
before torch is imported, shards that are copies are written on a thread while the new
tensors are drawn (two at a time), and none of it changes a byte of the output.

The figures are in benchmarks/bench_fuse.py; these tests check the guarantees.
"""

from __future__ import annotations

import errno
import hashlib
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from fusesurgery.convert.detect import detect_model
from fusesurgery.errors import WriteError
from fusesurgery.io import FileRegion, TensorInfo, open_checkpoint
from fusesurgery.surgery.fuse_plan import FuseOptions
from fusesurgery.write import convert_checkpoint, copy_ahead, safetensors_writer
from fusesurgery.write import fuse_checkpoint as fuse_module
from fusesurgery.write.copy_ahead import CopyAhead
from fusesurgery.write.fuse_checkpoint import _TwoAtOnce, files_kept_whole, fuse_checkpoints
from fusesurgery.write.safetensors_writer import write_safetensors
from tests.fusion_inputs import save_decoder, save_encoder

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

# sha256 of every shard and the index of two fuses of the bundled examples, as the code before
# this work (commit 5eb8797: one shard after the other, one new tensor drawn ahead) wrote them;
# seed 7's last two shards, which hold the new tensors, as they are since --seed reaches them
# (before, every seed drew seed 0's values: tests/surgery/test_new_params_seed.py).
BEFORE = {
    "every 2": ({"every": 2}, {
        "model-00001-of-00003.safetensors":
            "e635f5bef46c53ae0faba3e18ae81236b6da25ac7bd0416c0eace11d73edb542",
        "model-00002-of-00003.safetensors":
            "52f2cf2b1309b280d4d0177da24db537b95b0903c9e1dd3fbac32c587e809fe1",
        "model-00003-of-00003.safetensors":
            "ab0187affa95091e02694d50f220a6ee65c32196662dd953f035133587b32c03",
        "model.safetensors.index.json":
            "e0604dc2499216a638a3b4e74752677b2a98670c49420705c6596f321f04929f",
    }),
    "100KB shards, normal init, seed 7": (
        {"max_shard_size": "100KB", "embedding_init": "normal", "seed": 7}, {
            "model-00001-of-00010.safetensors":
                "89d8d6f74181469ea9b6f395dfbc2821a596a13867e46d76c6d99e5224c8aacb",
            "model-00002-of-00010.safetensors":
                "3db68d1f599bbf417e2afadd2b697aaa574d72f814ade5253c520bfd953997d4",
            "model-00003-of-00010.safetensors":
                "c1432c990d071645353d2438e61cdb32a6b8acd582fe7c4c99536baf207eaa39",
            "model-00004-of-00010.safetensors":
                "36ed4a737ed4095c7c164d809cabbc4c1c5acb906e3abae704827b8b64ecd6c0",
            "model-00005-of-00010.safetensors":
                "9e87f10bcaa12113d07522c3664f7a56d5425ed2d6be81d8b1d04263edcd2453",
            "model-00006-of-00010.safetensors":
                "b669ac1463a9c19c5c1db14eb049944fed947257301e47d809d92b5f03f2c214",
            "model-00007-of-00010.safetensors":
                "9da46279d019da98475f6e155d202aeaf53d4aa1028373ef18b38473f3a9fa1c",
            "model-00008-of-00010.safetensors":
                "007dd9a1629a4a83bf263040ff69135aeafe48e76e417e6c2efd1d0b6b79cf69",
            "model-00009-of-00010.safetensors":
                "eb9c2f428fdc661aeab7bdcdf4dc53a4e24290441d84844060944a348a295a15",
            "model-00010-of-00010.safetensors":
                "7f71df192e0b2381f69e3616b5c4a29a3042d2ff24c7dd433b5c0ae8c5a557d7",
            "model.safetensors.index.json":
                "85051b63415c0b6fd24e4dd228474ddf06777590e43bd5483539a0652c2744cf",
        }),
}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def partials(directory: Path) -> list[str]:
    return [name for name in os.listdir(directory) if ".partial-" in name]


@pytest.mark.parametrize("case", list(BEFORE))
def test_the_output_is_byte_for_byte_what_it_was_before(tmp_path, case):
    kwargs, expected = BEFORE[case]
    options = {key: kwargs[key] for key in ("every", "embedding_init", "seed") if key in kwargs}
    from fusesurgery import fuse

    fuse(EXAMPLES / "tiny-clip-vision", EXAMPLES / "tiny-llama", tmp_path / "out",
         max_shard_size=kwargs.get("max_shard_size", "5GB"), **options)
    got = {name: sha256(tmp_path / "out" / name) for name in expected}
    assert got == expected
    assert sorted(p.name for p in (tmp_path / "out").glob("model*")) == sorted(expected)


# A child's prelude: every CopyAhead the writer starts is recorded with whether torch was
# already imported at that moment.
SPY = """
import sys
from fusesurgery.write import copy_ahead
seen = []
class Spy(copy_ahead.CopyAhead):
    def __init__(self, out_dir, files):
        seen.append(("torch" in sys.modules, [str(f) for f in files]))
        super().__init__(out_dir, files)
copy_ahead.CopyAhead = Spy
import fusesurgery.write.fuse_checkpoint as fc
fc.CopyAhead = Spy
"""

CHILD = SPY + """
assert "torch" not in sys.modules
fc.fuse_checkpoints(sys.argv[1], sys.argv[2], sys.argv[3])
print(seen)
"""


def test_the_decoder_file_starts_copying_before_torch_is_imported(tmp_path):
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(EXAMPLES / "tiny-clip-vision"),
         str(EXAMPLES / "tiny-llama"), str(tmp_path / "out")],
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    ((torch_loaded, files),) = eval(done.stdout.strip())  # noqa: S307 - our own repr
    assert torch_loaded is False
    assert files == [str((EXAMPLES / "tiny-llama" / "model.safetensors").resolve())]
    assert partials(tmp_path) == []


CLI_CHILD = SPY + """
from fusesurgery.cli import main
sys.argv = ["fusesurgery", "fuse", *sys.argv[1:]]
try:
    main()
finally:
    print(seen)
"""


def test_the_command_line_starts_copying_before_torch_is_imported(tmp_path):
    # the command's own work before the writer (choosing the layout among them) imports no
    # torch: every second spent importing it there is a second the disk stays idle
    done = subprocess.run(
        [sys.executable, "-c", CLI_CHILD, str(EXAMPLES / "tiny-clip-vision"),
         str(EXAMPLES / "tiny-llama"), "-o", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    ((torch_loaded, files),) = eval(done.stdout.strip().splitlines()[-1])  # noqa: S307
    assert torch_loaded is False
    assert files == [str((EXAMPLES / "tiny-llama" / "model.safetensors").resolve())]
    assert (tmp_path / "out" / "fusion_config.json").is_file()
    assert partials(tmp_path) == []


GC_CHILD = """
import gc, sys
full = []
gc.callbacks.append(lambda phase, info: phase == "stop" and info["generation"] == 2
                    and full.append("torch" in sys.modules))
from fusesurgery.write.fuse_checkpoint import fuse_checkpoints
assert "torch" not in sys.modules and gc.get_freeze_count() == 0
fuse_checkpoints(sys.argv[1], sys.argv[2], sys.argv[3] + "/a")
frozen = gc.get_freeze_count()
assert gc.isenabled() and frozen > 50_000, frozen  # torch's objects, out of every collection
fuse_checkpoints(sys.argv[1], sys.argv[2], sys.argv[3] + "/b")
assert gc.get_freeze_count() <= frozen  # once per process (frozen objects still die)
print(full)
"""


def test_torchs_import_is_not_walked_by_full_garbage_collections(tmp_path):
    # each full collection during torch's import walks its ~150,000 objects again (about 0.5 s
    # of CPU in all, before the first new tensor can be drawn)
    done = subprocess.run(
        [sys.executable, "-c", GC_CHILD, str(EXAMPLES / "tiny-clip-vision"),
         str(EXAMPLES / "tiny-llama"), str(tmp_path)],
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert eval(done.stdout.strip()) == []  # noqa: S307 - our own repr


def test_the_writer_takes_the_copy_made_ahead(tmp_path, monkeypatch):
    mirrors = []
    real = safetensors_writer._write_mirror
    monkeypatch.setattr(safetensors_writer, "_write_mirror",
                        lambda *args: (mirrors.append((args[1], args[6])), real(*args)))
    fuse_checkpoints(EXAMPLES / "tiny-clip-vision", EXAMPLES / "tiny-llama", tmp_path / "out")
    assert mirrors == [((EXAMPLES / "tiny-llama" / "model.safetensors"), True)]
    assert partials(tmp_path) == []  # the copy-ahead directory is gone too


def _sharded_llama(root: Path) -> Path:
    llama, _ = save_decoder("llama", root)
    convert_checkpoint(llama, root / "sharded", to="hf", max_shard_size="40KB")
    assert len(list((root / "sharded").glob("*.safetensors"))) > 1
    return root / "sharded"


def _native_llama(root: Path) -> Path:
    llama, _ = save_decoder("llama", root)
    convert_checkpoint(llama, root / "native")
    return root / "native"


DECODERS = {
    "llama": lambda root: (save_decoder("llama", root)[0], None),
    "qwen2 tied": lambda root: (save_decoder("qwen2-tied", root)[0], None),
    "lone file": lambda root: (save_decoder("safetensors", root)[0],
                               {"num_heads": 4, "num_kv_heads": 2}),
    "native": lambda root: (_native_llama(root), None),
    "sharded": lambda root: (_sharded_llama(root), None),
    "pt": lambda root: (save_decoder("pt", root)[0], {"num_heads": 4, "num_kv_heads": 2}),
}


@pytest.mark.parametrize(("decoder", "encoder", "options"), [
    ("llama", "clip", FuseOptions(every=1)),
    ("qwen2 tied", "siglip", FuseOptions(every=1)),
    ("lone file", "clip-full", FuseOptions(every=1)),
    ("native", "clip", FuseOptions(every=1)),
    ("sharded", "clip", FuseOptions(every=1)),
    ("pt", "clip", FuseOptions(every=1)),
    ("llama", "clip", FuseOptions(every=1, dtype=torch.float32)),  # its own dtype: no cast
    ("llama", "clip", FuseOptions(every=1, dtype=torch.bfloat16)),
])
def test_the_files_copied_ahead_are_the_files_the_writer_copies_whole(
        tmp_path, monkeypatch, decoder, encoder, options):
    decoder_path, overrides = DECODERS[decoder](tmp_path / "in")
    encoder_path = save_encoder(encoder, tmp_path / "in")
    predicted = []
    for part, path, part_overrides in (("decoder", decoder_path, overrides),
                                       ("encoder", encoder_path, None)):
        with open_checkpoint(path) as source:
            detected = detect_model(source.infos(), source.config, source.config_file,
                                    part_overrides)
            predicted += files_kept_whole(part, source, detected, options, "5GB")
    mirrored = []
    real = safetensors_writer._write_mirror
    monkeypatch.setattr(safetensors_writer, "_write_mirror",
                        lambda *args: (mirrored.append(args[1]), real(*args)))
    fuse_checkpoints(encoder_path, decoder_path, tmp_path / "out", options=options,
                     decoder_overrides=overrides)
    assert sorted(map(str, predicted)) == sorted(map(str, mirrored))
    assert partials(tmp_path) == []


def test_no_copy_ahead_when_the_disk_could_not_hold_it_and_the_output(tmp_path, monkeypatch):
    monkeypatch.setattr(fuse_module, "_room_for", lambda out, needed: False)
    made = []
    real = copy_ahead.CopyAhead.__init__

    def spy(self, out_dir, files):
        made.append(list(files))
        real(self, out_dir, files)

    monkeypatch.setattr(copy_ahead.CopyAhead, "__init__", spy)
    fuse_checkpoints(EXAMPLES / "tiny-clip-vision", EXAMPLES / "tiny-llama", tmp_path / "out")
    assert made == [[]]


def test_copy_ahead_copies_whole_files_and_removes_what_is_not_taken(tmp_path):
    sources = []
    for number in range(3):
        path = tmp_path / f"in{number}.bin"
        path.write_bytes(os.urandom(10_000 + number))
        sources.append(path)
    out = tmp_path / "out"
    with CopyAhead(out, sources) as ahead:
        assert ahead.take(tmp_path / "elsewhere.bin") is None
        copy = ahead.take(sources[1])
        assert copy is not None and copy.read_bytes() == sources[1].read_bytes()
        copy.rename(tmp_path / "taken")
        assert ahead.take(sources[1]) is None  # taken once
        assert len(partials(tmp_path)) == 1
    assert partials(tmp_path) == []
    assert (tmp_path / "taken").read_bytes() == sources[1].read_bytes()


def test_copy_ahead_gives_no_copy_of_a_file_that_changed_size(tmp_path):
    source = tmp_path / "in.bin"
    source.write_bytes(b"x" * 5000)
    with CopyAhead(tmp_path / "out", [source]) as ahead:
        ahead._done[source.resolve()].wait()
        source.write_bytes(b"x" * 6000)
        assert ahead.take(source) is None
    assert partials(tmp_path) == []


def test_copy_ahead_stops_between_kernel_calls_when_closed(tmp_path, monkeypatch):
    calls = []
    real = copy_ahead.copy_region
    entered, release = threading.Event(), threading.Event()

    def slow(fd, region, progress=None):
        calls.append(region.path)
        entered.set()
        release.wait(10)
        real(fd, region, progress)

    monkeypatch.setattr(copy_ahead, "copy_region", slow)
    sources = []
    for number in range(3):
        sources.append(tmp_path / f"in{number}.bin")
        sources[-1].write_bytes(b"y" * 4096)
    ahead = CopyAhead(tmp_path / "out", sources)
    assert entered.wait(10)
    closer = threading.Thread(target=ahead.close)
    closer.start()
    release.set()
    closer.join(10)
    assert not closer.is_alive()
    assert len(calls) == 1  # the files after the one being copied were never started
    assert partials(tmp_path) == []


def test_a_failing_background_shard_fails_the_write_and_leaves_nothing(tmp_path, monkeypatch):
    tensors = {"a": torch.randn(64, 8), "b": torch.randn(32)}
    save_file(tensors, tmp_path / "src.safetensors", metadata={"format": "pt"})
    failed_on = []

    def disk_full(fd, region, progress=None):
        failed_on.append(threading.current_thread().name)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors_writer, "copy_region", disk_full)
    with open_checkpoint(tmp_path / "src.safetensors") as source:
        infos = [TensorInfo("x." + key, tuple(t.shape), t.dtype) for key, t in tensors.items()]
        infos.append(TensorInfo("new", (4,), torch.float32))

        def get(name):
            if name == "new":
                return torch.ones(4)
            return source.file_region(name.removeprefix("x."))

        with pytest.raises(WriteError, match="No space left"):
            write_safetensors(tmp_path / "out", infos, get, new_shard_at={"new"})
    assert failed_on and failed_on[0].startswith("fusesurgery-copy")
    assert not (tmp_path / "out").exists()
    assert partials(tmp_path) == []


def test_copy_shards_run_beside_the_tensor_shards(tmp_path, monkeypatch):
    # the tensor shard is produced while the copy shard is still being copied
    save_file({"a": torch.randn(64, 8)}, tmp_path / "src.safetensors", metadata={"format": "pt"})
    copying, produced = threading.Event(), threading.Event()
    real = safetensors_writer.copy_region

    def waiting_copy(fd, region, progress=None):
        copying.set()
        assert produced.wait(10), "the tensor shard waited for the copy"
        real(fd, region, progress)

    monkeypatch.setattr(safetensors_writer, "copy_region", waiting_copy)
    with open_checkpoint(tmp_path / "src.safetensors") as source:
        infos = [TensorInfo("a", (64, 8), torch.float32), TensorInfo("new", (4,), torch.float32)]

        def get(name):
            if name == "a":
                return source.file_region("a")
            assert copying.wait(10)
            produced.set()
            return torch.ones(4)

        write_safetensors(tmp_path / "out", infos, get, new_shard_at={"new"})
    with open_checkpoint(tmp_path / "out") as out:
        assert torch.equal(out.get_tensor("new"), torch.ones(4))
        with open_checkpoint(tmp_path / "src.safetensors") as source:
            assert torch.equal(out.get_tensor("a"), source.get_tensor("a"))


def test_two_at_once_never_holds_more_than_two_new_tensors():
    alive, peak, lock = set(), [0], threading.Lock()

    class Tracked:
        def __init__(self, name):
            self.name = name
            with lock:
                alive.add(name)
                peak[0] = max(peak[0], len(alive))

        def __del__(self):
            with lock:
                alive.discard(self.name)

    names = [f"t{i}" for i in range(12)]
    with _TwoAtOnce(names, {name: (lambda n=name: Tracked(n)) for name in names}) as ahead:
        for name in names:
            tensor = ahead.get(name)
            assert tensor.name == name
            del tensor  # as the writer does before asking for the next
    assert peak[0] <= 2


def test_copy_regions_of_a_file_region_list_decide_as_the_writer(tmp_path):
    # whole_file_source: one file exactly, in order, under a header that fits
    save_file({"a": torch.randn(8, 4), "b": torch.randn(4)}, tmp_path / "f.safetensors",
              metadata={"format": "pt"})
    with open_checkpoint(tmp_path / "f.safetensors") as source:
        regions = [source.file_region("a"), source.file_region("b")]
        infos = [TensorInfo("a", (8, 4), torch.float32), TensorInfo("b", (4,), torch.float32)]
        path = (tmp_path / "f.safetensors")
        assert safetensors_writer.whole_file_source(infos, regions) == regions[0].path
        assert safetensors_writer.whole_file_source(infos[::-1], regions[::-1]) is None
        assert safetensors_writer.whole_file_source(infos[:1], regions[:1]) is None
        long = [TensorInfo("x" * 400 + info.name, info.shape, info.dtype) for info in infos]
        assert safetensors_writer.whole_file_source(long, regions) is None  # no room
        part = FileRegion(path, regions[0].offset, regions[0].nbytes - 4)
        assert safetensors_writer.whole_file_source(
            [TensorInfo("a", (31,), torch.float32), infos[1]], [part, regions[1]]) is None


def test_a_failure_stops_the_copies_at_once_and_leaves_nothing(tmp_path, monkeypatch):
    # a decoder copy that would take 20 s (many kernel calls); the new tensors fail at once
    import time

    from fusesurgery.surgery import new_params

    def slow_copy(fd, region, progress=None):
        for step in range(400):
            time.sleep(0.05)
            if progress is not None:
                progress(step)
        raise AssertionError("the copy was not stopped")

    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(copy_ahead, "copy_region", slow_copy)
    monkeypatch.setattr(new_params, "make_new_tensor", boom)
    start = time.perf_counter()
    with pytest.raises(RuntimeError, match="boom"):
        fuse_checkpoints(EXAMPLES / "tiny-clip-vision", EXAMPLES / "tiny-llama",
                         tmp_path / "out")
    assert time.perf_counter() - start < 10
    assert not (tmp_path / "out").exists()
    assert partials(tmp_path) == []


def test_uniform_tensors_are_the_values_drawn_before(monkeypatch):
    # drawn into their own mapping, reusing one float32 chunk: the same values as one fresh
    # float32 chunk after another into a plain tensor (the code before)
    from fusesurgery.surgery import new_params
    from fusesurgery.surgery.fuse_plan import NewTensor

    monkeypatch.setattr(new_params, "UNIFORM_CHUNK", 1000)
    for dtype in (torch.bfloat16, torch.float32, torch.float16):
        spec = NewTensor("w", (37, 101), dtype, ("uniform", 0.05))
        generator = new_params.generator_for(3, "w")
        expected = torch.empty(spec.shape, dtype=dtype).view(-1)
        for start in range(0, expected.numel(), 1000):
            piece = expected[start:start + 1000]
            piece.copy_(torch.empty(piece.numel()).uniform_(-0.05, 0.05, generator=generator))
        got = new_params.make_new_tensor(spec, 3)
        assert got.shape == spec.shape and got.dtype == dtype
        assert torch.equal(got.view(-1).view(torch.uint8), expected.view(torch.uint8))
    assert new_params.make_new_tensor(NewTensor("e", (0, 4), torch.bfloat16,
                                                ("uniform", 1.0)), 0).shape == (0, 4)
