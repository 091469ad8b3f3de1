"""The Colab notebook, executed top to bottom with nbclient on the bundled rice sample.

Its `parameters` cell is overridden the way papermill does it: a cell tagged `injected-parameters` right after
it. The kernel is this interpreter's (a kernel spec written for `sys.executable`), started in notebooks/, so the
notebook finds this checkout around it and installs nothing; every path it writes is under tmp_path.
"""

import ast
import contextlib
import http.server
import json
import os
import re
import sqlite3
import sys
import threading
import urllib.parse

import pytest

nbformat = pytest.importorskip("nbformat", reason="the notebook test needs nbformat (pip install nbclient)")
nbclient = pytest.importorskip("nbclient", reason="the notebook test needs nbclient (pip install nbclient)")
kernelspec = pytest.importorskip("ipykernel.kernelspec",
                                 reason="the notebook test needs ipykernel (pip install ipykernel)")

from conftest import REPO, SAMPLE_RICE  # noqa: E402

NOTEBOOK = os.path.join(REPO, "notebooks", "colab_experiments.ipynb")


def parameters_cell(nb):
    cells = [i for i, cell in enumerate(nb.cells) if "parameters" in cell.metadata.get("tags", [])]
    assert len(cells) == 1, f"expected one cell tagged 'parameters', found {len(cells)}"
    return cells[0]


def inject(nb, **values):
    """Adds a cell tagged 'injected-parameters' after the 'parameters' cell, as papermill does. Every name must be
    a parameter."""
    index = parameters_cell(nb)
    defined = {target.id for node in ast.parse(nb.cells[index].source).body if isinstance(node, ast.Assign)
               for target in node.targets}
    assert set(values) <= defined, f"not parameters of the notebook: {sorted(set(values) - defined)}"
    cell = nbformat.v4.new_code_cell("\n".join(f"{name} = {value!r}" for name, value in values.items()))
    cell.metadata["tags"] = ["injected-parameters"]
    nb.cells.insert(index + 1, cell)
    return nb


def execute(nb, tmp_path, folder=os.path.dirname(NOTEBOOK)):
    """Runs `nb` in a kernel of this interpreter, started in `folder`; returns the executed notebook."""
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import AsyncKernelManager

    kernels = tmp_path / "kernels"
    # argv: sys.executable -m ipykernel_launcher; IPython's history and profile under tmp_path, not in ~/.ipython
    kernelspec.write_kernel_spec(str(kernels / "this-python"),
                                 overrides={"env": {"IPYTHONDIR": str(tmp_path / "ipython")}})
    specs = KernelSpecManager(kernel_dirs=[str(kernels)])
    km = AsyncKernelManager(kernel_name="this-python", kernel_spec_manager=specs)
    client = nbclient.NotebookClient(nb, km=km, timeout=300,
                                     resources={"metadata": {"path": str(folder)}})
    return client.execute()


def tiny(tmp_path):
    """The sample, 6 images per variety at 32 px, one epoch per phase, one ratio, random weights, no CIFAR."""
    return dict(RUN_CIFAR=False, DATA_DIR=SAMPLE_RICE, IMAGE_SIZE=32, WEIGHTS="none", HEAD_EPOCHS=1,
                RETRAIN_EPOCHS=1, RATIOS="0.5", LIMIT_PER_CLASS=6, BATCH_SIZE=8, SPLIT_BY="random",
                MIXED_PRECISION="float32", RICE_OPTIONS="-v 0", DB=str(tmp_path / "log" / "experiments.db"),
                RESULTS_DIR=str(tmp_path / "results"), RUNS_DIR=str(tmp_path / "runs"))


def outputs(nb, kind):
    """What the cells of an executed notebook showed: their printed text (kind 'text'), the Markdown they
    displayed ('text/markdown'), or how many PNGs they displayed ('image/png')."""
    found = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.get("outputs", [])]
    if kind == "text":
        return "".join(out.get("text", "") for out in found if out.output_type == "stream")
    if kind == "image/png":
        return sum(kind in out.get("data", {}) for out in found)
    return "".join(out.get("data", {}).get(kind, "") for out in found)


def test_the_colab_notebook_runs_the_cli_on_the_rice_sample_and_writes_the_log_and_the_report(tmp_path):
    nb = inject(nbformat.read(NOTEBOOK, as_version=4), **tiny(tmp_path))
    done = execute(nb, tmp_path)

    text = outputs(done, "text")
    assert f"toolkit: {REPO}\n" in text and f"Python: {sys.executable}\n" in text  # this checkout, this Python
    assert "pip install" not in text and "git clone" not in text  # nothing installed or downloaded

    with contextlib.closing(sqlite3.connect(tmp_path / "log" / "experiments.db")) as con:
        runs = con.execute("SELECT experiment, pruning_ratio, status, parent_id FROM runs ORDER BY id").fetchall()
    assert runs == [("rice", 0.0, "completed", None), ("rice", 0.5, "completed", 1)]

    results = tmp_path / "results"
    for name in ("rice_results.md", "rice_accuracy.png", "report.md", "report_rice_accuracy.png",
                 "report_epoch_times.png", "report_layers_kept.png"):
        assert (results / name).stat().st_size > 0, name
    report = (results / "report.md").read_text()
    assert "2 completed runs" in report and "| rice_sample | l1 | 0.5 |" in report
    assert outputs(done, "image/png") == 3  # the report's three plots, shown in the notebook
    shown = outputs(done, "text/markdown")
    assert "# Experiment report" in shown  # the report, shown
    for ranker, ratio in (("baseline", "0"), ("l1", "0.5")):  # and the direct query of the log
        assert re.search(rf"\| rice \| {ranker} \| {ratio} \| [0-9.]+ \| [0-9,]+ \|", shown), shown


def test_a_failing_command_stops_the_notebook_with_its_error(tmp_path):
    """A CLI command that fails fails its cell (no '!' magic that ignores exit codes), and later cells do not run."""
    nb = inject(nbformat.read(NOTEBOOK, as_version=4), **{**tiny(tmp_path), "IMAGE_SIZE": 16})
    with pytest.raises(nbclient.exceptions.CellExecutionError, match="CalledProcessError"):
        execute(nb, tmp_path)
    assert not (tmp_path / "results" / "report.md").exists()


def setup_function_named(name):
    """A function of the notebook's setup cell (with the cell's imports), to call here without a kernel."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    tree = ast.parse(next(cell.source for cell in nb.cells if cell.get("id") == "setup"))
    keep = [node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))
            or isinstance(node, ast.FunctionDef) and node.name == name]
    namespace = {}
    exec(compile(ast.Module(keep, type_ignores=[]), NOTEBOOK, "exec"), namespace)
    return namespace[name]


@pytest.fixture
def jupyter_server(monkeypatch):
    """A stand-in for the Jupyter server of a Colab VM: answers /api/sessions with `sessions[0]`, at the address
    Colab gives its kernels in $COLAB_JUPYTER_IP and $KMP_TARGET_PORT."""
    sessions = [[]]

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps(sessions[0]).encode()
            self.send_response(200 if self.path == "/api/sessions" else 404)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    monkeypatch.setenv("COLAB_JUPYTER_IP", "127.0.0.1")
    monkeypatch.setenv("KMP_TARGET_PORT", str(server.server_port))
    yield sessions
    server.shutdown()
    server.server_close()


def test_on_colab_the_setup_finds_the_github_repository_and_branch_the_notebook_was_opened_from(jupyter_server):
    colab_origin = setup_function_named("colab_origin")
    url = "https://github.com/someone/keras-pruning-toolkit/blob/fix/notebook/notebooks/colab_experiments.ipynb"
    jupyter_server[0] = [{"name": "colab_experiments.ipynb", "path": "fileId=" + urllib.parse.quote(url, safe="")}]
    assert colab_origin() == ("https://github.com/someone/keras-pruning-toolkit.git", "fix/notebook")

    jupyter_server[0] = [{"name": "colab_experiments.ipynb", "path": "fileId=1a2B3c4D5e6F7g8H9i"}]  # a Drive copy
    assert colab_origin() is None  # the setup then asks for REPO_URL


def test_without_a_jupyter_server_colab_origin_says_nothing(monkeypatch):
    monkeypatch.setenv("COLAB_JUPYTER_IP", "127.0.0.1")
    monkeypatch.setenv("KMP_TARGET_PORT", "1")  # nothing listens there
    assert setup_function_named("colab_origin")() is None


def test_outside_a_checkout_and_colab_the_setup_asks_for_repo_url(tmp_path):
    """A notebook downloaded on its own, run in Jupyter: no checkout around it, no Colab session to ask."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    nb = inject(nbformat.read(NOTEBOOK, as_version=4), **tiny(tmp_path))
    with pytest.raises(nbclient.exceptions.CellExecutionError, match="Expected REPO_URL"):
        execute(nb, tmp_path, elsewhere)
    assert os.listdir(elsewhere) == []  # nothing cloned
