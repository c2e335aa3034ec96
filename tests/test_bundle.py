"""The deployment bundle of every convert output: files, verify, predict (torch-free), Triton, offline optimisation.

One real conversion (timm's test_vit, random weights, a folder of odd-sized JPEGs) is shared by all tests; a
test that changes a bundle works on a copy.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from google.protobuf import text_format
from PIL import Image

import vitcompress
from tests.test_cli import one_error_line
from vitcompress.cli import main
from vitcompress.context import DeployOptions
from vitcompress.deploy.bundle import read_checksums, verify, write_bundle, write_checksums
from vitcompress.deploy.runtime import Preprocessing, open_session

RECIPE = """
steps: []
finetune: null
validate: {images: 12, holdout_fraction: 0.75, batch_sizes: [1, 4], latency_runs: 3, warmup_runs: 1, profile_runs: 0,
           min_agreement: null}
"""
BUNDLE_FILES = {"model.onnx", "model.ort", "model.safetensors", "recipe.resolved.yaml", "report.json", "report.md",
                "report.html", "predictions.npz",
                "preprocess.json", "labels.txt", "inference.json", "predict.py", "requirements.txt", "SHA256SUMS",
                "golden/golden.json", "golden/inputs.npy", "golden/logits.npy",
                *(f"golden/images/{i:03d}.jpg" for i in range(8))}


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def run_without_torch(*argv: str) -> subprocess.CompletedProcess:
    """The vitcompress CLI in a fresh interpreter in which ``import torch`` fails."""
    script = ("import sys; sys.modules['torch'] = None; from vitcompress.cli import main; "
              f"main({list(argv)!r}, prog_name='vitcompress')")
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """3 class folders ('0', '1', '2' = class indices) of 4 JPEGs each, none of them square or of the input size."""
    root = tmp_path_factory.mktemp("images")
    for c in range(3):
        (root / str(c)).mkdir()
        for i in range(4):
            pixels = np.random.default_rng(10 * c + i).random((90 + 17 * i, 131 - 9 * i, 3)) * 255
            Image.fromarray(pixels.astype(np.uint8)).save(root / str(c) / f"{i}.jpg")
    return root


def held_out(images: Path) -> list[str]:
    """The held-out images of ``images`` (3 per class at holdout_fraction 0.75) in validation order: what the
    golden inputs are the first of."""
    from vitcompress.data import ImageDirectory, split_held_out

    directory = ImageDirectory(images, transform=None, class_index={str(c): c for c in range(3)})
    return [path.relative_to(images).as_posix() for path, _ in split_held_out(directory, 0.75)[1].items]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, images) -> Path:
    recipe = tmp_path_factory.mktemp("recipe") / "recipe.yaml"
    recipe.write_text(RECIPE)
    out = tmp_path_factory.mktemp("runs") / "bundle"
    vitcompress.convert("test_vit", recipe, data=str(images), out_dir=out, random_init=True,
                        deploy=DeployOptions(ort_format=True))
    return out


@pytest.fixture
def copy(bundle, tmp_path) -> Path:
    return Path(shutil.copytree(bundle, tmp_path / "copy"))


def test_convert_writes_a_complete_bundle(bundle, images):
    files = {p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file()}
    assert files == BUNDLE_FILES
    assert set(read_checksums(bundle)) == BUNDLE_FILES - {"SHA256SUMS", "report.html"}  # the page is a view
    assert subprocess.run(["sha256sum", "--quiet", "-c", "SHA256SUMS"], cwd=bundle).returncode == 0
    session = open_session(bundle / "model.onnx")
    preprocessing = Preprocessing.from_session(session)
    spec = json.loads((bundle / "preprocess.json").read_text())
    assert spec["input_size"] == [3, 160, 160] and spec["channels"] == 3
    assert (spec["mean"], spec["std"]) == (list(preprocessing.mean), list(preprocessing.std))
    assert spec["interpolation"] == preprocessing.interpolation and spec["crop_pct"] == preprocessing.crop_pct
    assert len((bundle / "labels.txt").read_text().splitlines()) == 1000
    inputs, logits = np.load(bundle / "golden/inputs.npy"), np.load(bundle / "golden/logits.npy")
    assert inputs.shape == (8, 3, 160, 160) and logits.shape == (8, 1000)
    np.testing.assert_allclose(session.run(None, {"input": inputs})[0], logits, atol=1e-5)
    assert (bundle / "golden/images/000.jpg").read_bytes() == (images / held_out(images)[0]).read_bytes()
    inference = json.loads((bundle / "inference.json").read_text())
    assert inference["intra_op_threads"] == 2 and inference["batch_sizes"] == [1, 4]
    assert inference["graph_optimization_level"] == "ORT_ENABLE_ALL" and inference["latency"]["b4"]["p50_ms"] > 0
    assert [r["file"] for r in inference["offline_optimization"]] == ["model.ort"], "convert --ort-format"
    assert (bundle / "requirements.txt").read_text().split()[0].startswith("onnxruntime==")


def test_verify_passes_on_the_bundle(bundle):
    result = invoke("verify", bundle)
    assert result.exit_code == 0, result.output
    assert "golden model.onnx: max |Δ logits| 0.00e+00" in result.output and "ok   golden model.ort" in result.output
    assert "preprocessing: max difference" in result.output and "bundle verified" in result.output


def test_verify_with_an_unknown_provider_is_one_line(bundle):
    result = invoke("verify", bundle, "--provider", "NoSuchExecutionProvider")
    assert result.exit_code == 2 and one_error_line(result.output) and "CPUExecutionProvider" in result.output


def test_verify_mismatch_exits_1_and_says_by_how_much(copy):
    logits = np.load(copy / "golden/logits.npy")
    logits[3, 7] += 0.25
    np.save(copy / "golden/logits.npy", logits)
    shutil.copyfile(copy / "golden/images/005.jpg", copy / "golden/images/001.jpg")  # another image's pixels
    write_checksums(copy)
    result = invoke("verify", copy, "--json")
    assert result.exit_code == 1
    checks = {c["name"]: c for c in json.loads(result.stdout)["checks"]}
    assert not checks["golden model.onnx"]["passed"] and "2.50e-01" in checks["golden model.onnx"]["detail"]
    assert not checks["preprocessing"]["passed"] and checks["checksums"]["passed"]


def corrupt(path: Path) -> None:
    path.write_bytes(b"\x08\x07garbage" + path.read_bytes()[100:200])


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "labels.txt").unlink(), "labels.txt is missing"),
    (lambda d: (d / "model.onnx").write_bytes((d / "model.onnx").read_bytes()[:-10]),
     "checksum mismatch for model.onnx"),
    (lambda d: (d / "SHA256SUMS").unlink(), "not a vitcompress bundle: no SHA256SUMS"),
    (lambda d: (corrupt(d / "model.onnx"), write_checksums(d)), "model.onnx does not load in onnxruntime"),
    (lambda d: ((d / "golden/golden.json").write_text("{"), write_checksums(d)), "not a valid golden spec"),
])
def test_verify_refuses_a_broken_bundle_with_one_line(copy, damage, message):
    damage(copy)
    result = invoke("verify", copy)
    assert result.exit_code == 2 and one_error_line(result.output) and message in result.output, result.output


def test_predict_verify_and_predict_py_run_without_torch(bundle, images, tmp_path):
    predicted = run_without_torch("predict", str(bundle), str(images), "--json", "--top-k", "3", "--batch-size", "5")
    assert predicted.returncode == 0, predicted.stderr
    rows = [json.loads(line) for line in predicted.stdout.splitlines()]
    assert [Path(r["path"]).relative_to(images).as_posix() for r in rows] == \
        [f"{c}/{i}.jpg" for c in range(3) for i in range(4)]
    golden = np.load(bundle / "golden/logits.npy")
    by_path = {Path(r["path"]).relative_to(images).as_posix(): r for r in rows}
    assert [by_path[path]["classes"][0] for path in held_out(images)[:8]] == golden.argmax(-1).tolist(), \
        "top-1 = the golden logits' top-1"
    assert all(len(r["labels"]) == 3 and r["probabilities"] == sorted(r["probabilities"], reverse=True) for r in rows)
    verified = run_without_torch("verify", str(bundle))
    assert verified.returncode == 0, verified.stderr
    # predict.py copied elsewhere with its bundle: neither torch nor vitcompress importable
    deployed = Path(shutil.copytree(bundle, tmp_path / "deployed"))
    script = ("import runpy, sys; sys.modules['torch'] = sys.modules['vitcompress'] = None; "
              f"sys.argv = ['predict.py', {str(images / '0')!r}, '--top-k', '3']; "
              f"runpy.run_path({str(deployed / 'predict.py')!r}, run_name='__main__')")
    standalone = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert standalone.returncode == 0, standalone.stderr
    for line, row in zip(standalone.stdout.splitlines(), rows[:4]):
        assert line.startswith(f"{row['path']}: {row['labels'][0]} ") and f", {row['labels'][2]} " in line


@pytest.mark.parametrize("args, message", [
    (["{bundle}", "{tmp}/not_an_image.jpg"], "cannot be read"),
    (["{bundle}", "{tmp}/empty_dir"], "holds no images"),
    (["{bundle}", "{tmp}/missing.png"], "does not exist"),
    (["{tmp}/empty_dir", "{images}"], "not a bundle: no model.onnx"),
    (["{bundle}", "{images}", "--top-k", "1001"], "--top-k"),
    (["{bundle}", "{images}", "--top-k", "0"], "--top-k"),
    (["{bundle}"], "at least one IMAGE"),
    (["{bundle}", "{images}", "--provider", "NoSuchExecutionProvider"], "is not available"),
])
def test_predict_bad_input_is_one_line(bundle, images, tmp_path, args, message):
    (tmp_path / "not_an_image.jpg").write_text("hello")
    (tmp_path / "empty_dir").mkdir()
    result = invoke("predict", *[a.format(bundle=bundle, images=images, tmp=tmp_path) for a in args])
    assert result.exit_code == 2 and one_error_line(result.output) and message in result.output, result.output


def parse_config(path: Path):
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def test_export_triton_repository(bundle, tmp_path):
    from tritonclient.grpc import model_config_pb2 as mc

    repo = tmp_path / "repo"
    result = invoke("export", "triton", bundle, "--repo", repo, "--name", "vit", "--version", "3",
                    "--max-batch-size", "16", "--instances", "2")
    assert result.exit_code == 0, result.output
    config = parse_config(repo / "vit/config.pbtxt")
    assert config.name == "vit" and config.backend == "onnxruntime" and config.max_batch_size == 16
    assert [(t.name, list(t.dims), t.data_type) for t in config.input] == [("input", [3, 160, 160], mc.TYPE_FP32)]
    assert [(t.name, list(t.dims), t.label_filename) for t in config.output] == [("logits", [1000], "labels.txt")]
    assert list(config.dynamic_batching.preferred_batch_size) == [4], "the measured batch sizes above 1"
    assert [(g.count, g.kind) for g in config.instance_group] == [(2, mc.ModelInstanceGroup.KIND_CPU)]
    assert config.parameters["intra_op_thread_count"].string_value == "2"
    assert list(config.model_warmup[0].inputs["input"].dims) == [3, 160, 160]
    assert (repo / "vit/3/model.onnx").read_bytes() == (bundle / "model.onnx").read_bytes()
    assert (repo / "vit/labels.txt").read_text() == (bundle / "labels.txt").read_text()
    again = invoke("export", "triton", bundle, "--repo", repo, "--name", "vit")
    assert again.exit_code == 2 and one_error_line(again.output) and "pass --force" in again.output
    forced = invoke("export", "triton", bundle, "--repo", repo, "--name", "vit", "--kind", "gpu", "--force")
    assert forced.exit_code == 0, forced.output
    assert parse_config(repo / "vit/config.pbtxt").instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU
    assert sorted(p.name for p in repo.iterdir()) == ["vit"], "nothing else left in the repository"


def test_export_triton_refuses_batching_a_fixed_batch_axis(copy, tmp_path):
    model = onnx.load(str(copy / "model.onnx"))
    for value in (*model.graph.input, *model.graph.output):
        value.type.tensor_type.shape.dim[0].dim_value = 1
    onnx.save(model, str(copy / "model.onnx"))
    write_checksums(copy)
    result = invoke("export", "triton", copy, "--repo", tmp_path / "repo")
    assert result.exit_code == 2 and one_error_line(result.output) and "batch axis" in result.output
    assert not (tmp_path / "repo" / "copy").exists()
    unbatched = invoke("export", "triton", copy, "--repo", tmp_path / "repo", "--max-batch-size", "0")
    assert unbatched.exit_code == 0, unbatched.output
    config = parse_config(tmp_path / "repo/copy/config.pbtxt")
    assert config.max_batch_size == 0 and list(config.input[0].dims) == [1, 3, 160, 160]


def test_cascade_bundle_verifies_predicts_and_exports_two_triton_models(tiny_vit_dir, tmp_path):
    source, _ = tiny_vit_dir
    directory = tmp_path / "cascade"
    directory.mkdir()
    for name in ("model.onnx", "low.onnx", "high.onnx", "cascade.json"):
        shutil.copyfile(source / name, directory / name)
    preprocessing = Preprocessing.from_session(open_session(directory / "model.onnx"))
    pngs = [(f"{i}.png", (source / f"{i}.png").read_bytes()) for i in range(3)]
    write_bundle(directory, preprocessing.load([source / f"{i}.png" for i in range(3)]), pngs, threads=1,
                 latency={1: {"p50_ms": 1.0}, 8: {"p50_ms": 2.0}})
    result = verify(directory)
    assert result.ok and {"golden low.onnx", "golden high.onnx", "preprocessing"} <= {c.name for c in result.checks}
    assert (directory / "labels.txt").read_text().split("\n")[5] == "sandal"
    repo = tmp_path / "repo"
    assert invoke("export", "triton", directory, "--repo", repo, "--name", "fm").exit_code == 0
    assert sorted(p.name for p in repo.iterdir()) == ["fm-high", "fm-low"]
    low = parse_config(repo / "fm-low/config.pbtxt")
    entropy = next(t for t in low.output if t.name == "entropy")
    assert list(entropy.dims) == [1] and entropy.HasField("reshape") and list(low.input[0].dims) == [1, 28, 28]
    assert list(low.dynamic_batching.preferred_batch_size) == [8] and "entropy <= 0.5" in \
        (repo / "fm-low/cascade.md").read_text()


def test_convert_refuses_a_machine_specific_level_before_any_work(tmp_path):
    result = invoke("convert", "test_vit", "--recipe", "svd", "--random-init", "--out", tmp_path / "run",
                    "--optimize-offline", "extended")
    assert result.exit_code == 2 and one_error_line(result.output) and "--for-this-machine" in result.output
    assert not list(tmp_path.iterdir())


def test_export_optimized_adds_checked_files(copy):
    refused = invoke("export", "optimized", copy, "--optimize-offline", "all")
    assert refused.exit_code == 2 and one_error_line(refused.output) and "--for-this-machine" in refused.output
    assert not (copy / "model.opt.onnx").exists()
    result = invoke("export", "optimized", copy, "--optimize-offline", "extended", "--for-this-machine", "--ort-format")
    assert result.exit_code == 0, result.output
    inference = json.loads((copy / "inference.json").read_text())
    records = {r["file"]: r for r in inference["offline_optimization"]}
    assert set(records) == {"model.opt.onnx", "model.ort"}
    assert records["model.opt.onnx"]["level"] == "extended" and records["model.opt.onnx"]["for_this_machine"]
    assert all(r["max_abs_diff"] <= 1e-3 for r in records.values())
    checks = {c.name: c.passed for c in verify(copy).checks}
    assert checks["golden model.opt.onnx"] and checks["golden model.ort"] and checks["checksums"]
    assert not list(copy.glob(".optimize-*"))


def test_deployment_modules_never_import_torch():
    modules = ["vitcompress.deploy.bundle", "vitcompress.deploy.predict", "vitcompress.deploy.triton", "vitcompress.deploy.optimize",
               "vitcompress.deploy.templates.predict"]
    out = subprocess.run([sys.executable, "-X", "importtime", "-c", "import " + ", ".join(modules)],
                         capture_output=True, text=True, check=True)
    imported = {line.split("|")[-1].strip().split(".")[0] for line in out.stderr.splitlines() if "|" in line}
    assert "onnxruntime" in imported and "torch" not in imported and "timm" not in imported


IMAGES = 1_000


@pytest.mark.slow
def test_onnxruntime_path_top1_equals_torch_on_the_reference_test_split(tmp_path):
    """Raw Fashion-MNIST test images → the runtime's preprocessing → onnxruntime, against the pipeline's tensors →
    torch, on the embedded reference model's first 1,000 test images (all 10,000: 250 s on 2 loaded cores, run
    once on 2026-12-02 with IMAGES = 10_000: no image differed): the same top-1 for every image."""
    import torch

    from vitcompress.data import fmnist_dataset, load_fmnist_arrays
    from vitcompress.deploy.runtime import preprocessing_metadata, run_batches
    from vitcompress.export import export_onnx
    from vitcompress.models import load_model

    loaded = load_model("vit_fmnist")
    path = export_onnx(loaded.model, tmp_path / "m.onnx",
                       metadata=preprocessing_metadata(loaded.data_config, loaded.class_names))
    session = open_session(path, threads=2)
    preprocessing = Preprocessing.from_session(session)
    raw = load_fmnist_arrays("test")[0][:IMAGES]
    tensors = fmnist_dataset("test", limit=IMAGES).tensors[0]
    ort_top1, torch_top1 = [], []
    for start in range(0, len(raw), 500):
        batch = np.stack([preprocessing(Image.fromarray(image[0])) for image in raw[start:start + 500].numpy()])
        ort_top1.append(run_batches(session, [batch])[0].argmax(-1))
        with torch.no_grad():
            torch_top1.append(loaded.model(tensors[start:start + 500]).argmax(-1).numpy())
    ort_top1, torch_top1 = np.concatenate(ort_top1), np.concatenate(torch_top1)
    assert len(ort_top1) == IMAGES and (ort_top1 == torch_top1).all(), f"{(ort_top1 != torch_top1).sum()} differ"


def venv_with_only(packages: tuple[str, ...], where: Path) -> Path:
    """A virtual environment (no pip, no system site-packages) holding only ``packages``, linked from this
    environment's installed files (no network): ``import torch`` fails in it. Returns its python."""
    import importlib.metadata
    import venv

    venv.EnvBuilder(with_pip=False, symlinks=True).create(where)
    python = where / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    for package in packages:
        dist = importlib.metadata.distribution(package)
        tops = {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}
        for top in tops:
            source = Path(dist.locate_file(top))
            if source.exists() and not (site / top).exists():
                (site / top).symlink_to(source)
    return python


def test_predict_py_verify_checks_the_bundle_with_numpy_onnxruntime_and_pillow_only(bundle, tmp_path):
    """The bundle's own predict.py --verify in an environment of the bundle's requirements.txt packages alone:
    checksums, golden logits at the fp32 tolerance, preprocessing of the stored images; a changed file fails."""
    python = venv_with_only(("numpy", "onnxruntime", "pillow"), tmp_path / "venv")
    assert subprocess.run([str(python), "-c", "import torch"], capture_output=True).returncode == 1
    deployed = Path(shutil.copytree(bundle, tmp_path / "deployed"))
    done = subprocess.run([str(python), "predict.py", "--verify"], cwd=deployed, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = {line.split(":")[0]: line for line in done.stdout.splitlines()}
    assert list(lines) == ["ok   checksums", "ok   golden model.onnx", "ok   golden model.ort", "ok   preprocessing",
                           f"bundle {deployed}"] and lines[f"bundle {deployed}"].endswith(": verified")
    assert lines["ok   checksums"] == f"ok   checksums: {len(read_checksums(bundle))} files match SHA256SUMS"
    assert lines["ok   golden model.onnx"].endswith("(tolerance 0.001: fp32)")
    assert " grey levels (tolerance 1) on 8 source images" in lines["ok   preprocessing"]
    (deployed / "labels.txt").write_text("tampered\n")
    tampered = subprocess.run([str(python), "predict.py", "--verify"], cwd=deployed, capture_output=True, text=True,
                              timeout=120)
    assert tampered.returncode == 1 and "FAIL checksums: labels.txt changed" in tampered.stdout


def test_golden_records_precision_and_isa_and_int8_on_another_isa_gets_the_cross_isa_tolerance(copy):
    """An int8 model.onnx (onnxruntime dynamic quantisation) makes an int8 golden spec; a recorded converting CPU
    without this CPU's AVX-512 VNNI (a doctored record: one kind of CPU here) makes verify — the package's and
    predict.py's — use the cross-ISA int8 tolerance and say why; the package and predict.py agree."""
    import importlib.util

    from vitcompress.deploy.bundle import INT8_ATOL_OTHER_ISA, INT8_ATOL_SAME_ISA, golden_spec
    from vitcompress.deploy.cpus import isa_flags
    from vitcompress.quantize import quantize_onnx

    spec = golden_spec(copy)
    assert spec["models"]["model.onnx"]["precision"] == "fp32" and spec["isa"]["flags"] == isa_flags()
    quantize_onnx(copy / "model.onnx", copy / "int8.onnx", "dynamic")
    (copy / "int8.onnx").replace(copy / "model.onnx")
    (copy / "model.ort").unlink()
    inputs = np.load(copy / "golden/inputs.npy")
    images = [(p.name, p.read_bytes()) for p in sorted((copy / "golden/images").iterdir())]
    write_bundle(copy, inputs, images, threads=2)
    spec = golden_spec(copy)
    assert spec["models"]["model.onnx"] == {"precision": "int8", "atol": INT8_ATOL_SAME_ISA,
                                            "atol_other_isa": INT8_ATOL_OTHER_ISA}
    assert "golden model.onnx" in [c.name for c in verify(copy).checks] and verify(copy).ok
    flag = next((f for f in ("avx512_vnni", "avx_vnni", "avx2", "asimd") if f in isa_flags()), None)
    if flag is None:
        pytest.skip("this CPU has none of the flags the doctored record drops")
    spec["isa"]["flags"] = [f for f in spec["isa"]["flags"] if f != flag]
    (copy / "golden/golden.json").write_text(json.dumps(spec))
    write_checksums(copy)
    (check,) = [c for c in verify(copy).checks if c.name == "golden model.onnx"]
    assert check.passed and f"(tolerance {INT8_ATOL_OTHER_ISA:g}: int8 on another instruction set: this CPU adds " \
        f"{flag})" in check.detail
    template = importlib.util.spec_from_file_location("bundle_predict", copy / "predict.py")
    predict_py = importlib.util.module_from_spec(template)
    template.loader.exec_module(predict_py)
    assert predict_py.ISA_FLAGS == __import__("vitcompress.deploy.cpus", fromlist=["ISA_FLAGS"]).ISA_FLAGS
    done = subprocess.run([sys.executable, "predict.py", "--verify"], cwd=copy, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and f"int8 on another instruction set: this CPU adds {flag})" in done.stdout


def test_an_imagenet_model_s_bundle_names_its_classes_and_predict_prints_them(bundle, images):
    """test_vit has ImageNet-1k's 1000-class head: labels.txt holds ImageNet's class names, not 0 … 999."""
    from vitcompress.labels import imagenet_names

    assert (bundle / "labels.txt").read_text().splitlines() == imagenet_names(1000)
    result = invoke("predict", bundle, images / "0" / "0.jpg", "--json", "--top-k", "2")
    row = json.loads(result.stdout)
    assert row["labels"] == [imagenet_names(1000)[k] for k in row["classes"]]
