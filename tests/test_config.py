"""The config's metadata is its one check: `check_fields` (and so `validate()`) and the CLI's
options (`main_train.config_option`) both read each field's type, choices and range."""

import ast
import dataclasses
import os
import subprocess
import sys

import click
import pytest
from click.testing import CliRunner

from conftest import REPO, SAMPLE_RICE
from experiments.config import CifarConfig, CompressConfig, RiceConfig, check_field, check_fields, option
from main_train import config_from_options, config_options


def variant(cls, name, default, **meta):
    """`cls` with field `name` redefined by `option(default, ..., **meta)` (same position, same validate)."""
    field = next(f for f in dataclasses.fields(cls) if f.name == name)
    return dataclasses.make_dataclass(f"{cls.__name__}Variant",
                                      [(name, field.type, option(default, field.metadata["help"], **meta))],
                                      bases=(cls,))


def command(cls):
    """A click command whose options are built from `cls` as the real commands' are, then validate()."""
    @click.command()
    @config_options(cls)
    def run(**options):
        try:
            config_from_options(cls, options).validate()
        except ValueError as e:
            raise click.UsageError(str(e)) from e
        click.echo("valid")
    return run


def refusals(cls, args, **values):
    """(the CLI's output and exit code, validate()'s error or None) for the same values."""
    r = CliRunner().invoke(command(cls), ["--data-dir", SAMPLE_RICE, *args])
    try:
        cls(data_dir=SAMPLE_RICE, **values).validate()
        error = None
    except ValueError as e:
        error = str(e)
    return r.exit_code, r.output, error


def test_a_range_changed_in_the_metadata_moves_the_cli_and_validate():
    # Inside the old range (>= 32), outside the new (>= 64): both refuse.
    stricter = variant(RiceConfig, "image_size", 224, min=64)
    code, out, error = refusals(stricter, ["--image-size", "48"], image_size=48)
    assert code == 2 and "48 is not in the range x>=64" in out
    assert error == "Expected image_size >= 64. Received: image_size=48"
    assert refusals(RiceConfig, ["--image-size", "48"], image_size=48)[::2] == (0, None)  # the old one took it
    # And the other way: 24 was refused, is now taken by both.
    looser = variant(RiceConfig, "image_size", 224, min=16)
    code, out, error = refusals(looser, ["--image-size", "24"], image_size=24)
    assert (code, error) == (0, None) and "valid" in out, out
    code, out, error = refusals(RiceConfig, ["--image-size", "24"], image_size=24)
    assert code == 2 and "24 is not in the range x>=32" in out
    assert error == "Expected image_size >= 32. Received: image_size=24"


def test_an_element_range_and_a_choice_changed_in_the_metadata_move_both_alike():
    # Each element of a comma-separated option: the CLI and validate() give the one same message.
    half = variant(RiceConfig, "ratios", (0.1,), parse="floats", min=0.0, max=0.5, max_open=True, item_name="ratio")
    code, out, error = refusals(half, ["--ratios", "0.1,0.7"], ratios=(0.1, 0.7))
    assert code == 2 and error == "Expected ratio in [0, 0.5). Received: ratio=0.7"
    assert error in out
    assert refusals(RiceConfig, ["--ratios", "0.1,0.7"], ratios=(0.1, 0.7))[::2] == (0, None)
    # A choice added to the metadata is offered by the CLI and accepted by validate().
    more = variant(RiceConfig, "pooling", "avg", choices=("avg", "flatten", "max"))
    code, out, error = refusals(more, ["--pooling", "max"], pooling="max")
    assert (code, error) == (0, None), out
    code, out, error = refusals(RiceConfig, ["--pooling", "max"], pooling="max")
    assert code == 2 and "'max' is not one of 'avg', 'flatten'" in out
    assert error == "Expected pooling in ('avg', 'flatten'). Received: pooling='max'"


@pytest.mark.parametrize("cfg,message", [
    (RiceConfig(pooling="max"), "Expected pooling in ('avg', 'flatten'). Received: pooling='max'"),
    (RiceConfig(image_size=16), "Expected image_size >= 32. Received: image_size=16"),
    (RiceConfig(unfreeze=14), "Expected unfreeze in [0, 13]. Received: unfreeze=14"),
    (RiceConfig(limit_per_class=0), "Expected limit_per_class >= 1. Received: limit_per_class=0"),
    (CifarConfig(width=0), "Expected width in (0, 4]. Received: width=0"),
    (CompressConfig(target_macs=0.0), "Expected target_macs in (0, 1]. Received: target_macs=0.0"),
    (CompressConfig(target_macs=0.5, temperature=0), "Expected temperature > 0. Received: temperature=0"),
    (CompressConfig(target_macs=0.5, export="tflite"),
     "Expected export in ('litert', 'saved_model', 'onnx'). Received: export='tflite'"),
    # tuple elements: named by the field's item_name, else field[i]
    (RiceConfig(ratios=(0.1, 1.5)), "Expected ratio in [0, 1). Received: ratio=1.5"),
    (CifarConfig(compress_rate=(0.5,) * 12 + (1.2,)),
     "Expected compress_rate[12] in [0, 1). Received: compress_rate[12]=1.2"),
    (RiceConfig(ratios=()), "Expected at least one ratio. Received: ratios=()"),
    (RiceConfig(holdout_range=(-1, 5)), "Expected holdout_range[0] >= 0. Received: holdout_range[0]=-1"),
    (CifarConfig(seeds=(0, "1")), "Expected seeds[1] an integer. Received: seeds[1]='1'"),
    # a field's own check: what a range cannot say
    (RiceConfig(holdout_range=(9, 5)), "Expected holdout_range FIRST,LAST with 0 <= FIRST <= LAST"),
    (CifarConfig(compress_rate=(0.5, 0.5)), "Expected one compress rate or 13. Received: 2 rates"),
    # wrong types from library use
    (RiceConfig(batch_size=2.5), "Expected batch_size an integer >= 1. Received: batch_size=2.5"),
    (RiceConfig(batch_size=True), "Expected batch_size an integer >= 1. Received: batch_size=True"),
    (RiceConfig(batch_size=None), "Expected batch_size a value, not None. Received: batch_size=None"),
    (RiceConfig(augment="yes"), "Expected augment True or False. Received: augment='yes'"),
    (CompressConfig(target_macs=0.5, lr="0.1"), "Expected lr a number >= 0. Received: lr='0.1'"),
    (CompressConfig(target_macs=0.5, ranker=3), "Expected ranker a string. Received: ranker=3"),
    (RiceConfig(ratios=0.1), "Expected ratios a list or tuple. Received: ratios=0.1"),
])
def test_check_fields_names_the_value_and_what_is_accepted(cfg, message):
    with pytest.raises(ValueError) as e:
        check_fields(cfg)
    assert str(e.value).startswith(message)


def test_check_fields_accepts_the_defaults_none_for_optional_and_numbers_of_either_kind():
    for cfg in (RiceConfig(), CifarConfig(), CompressConfig(target_macs=0.5),
                CompressConfig(target_params=1, lr=0, image_size=None, export="onnx"), RiceConfig(ratios=[0.5])):
        check_fields(cfg)


def test_bounds_below_above_and_open_read_as_written():
    field = dataclasses.field(default=1, metadata={"max": 5, "max_open": True})
    field.name, field.type = "n", int
    check_field(field, 4)
    with pytest.raises(ValueError, match=r"^Expected n < 5. Received: n=5$"):
        check_field(field, 5)
    field.type = float
    with pytest.raises(ValueError, match=r"^Expected n < 5. Received: n=nan$"):  # NaN is in no range
        check_field(field, float("nan"))
    with pytest.raises(ValueError, match=r"^Expected n a number < 5. Received: n='4'$"):
        check_field(field, "4")


def test_validate_checks_the_fields_before_the_file_system():
    with pytest.raises(ValueError, match="Expected pooling in"):
        RiceConfig(data_dir="/no/such/folder", pooling="max").validate()


def test_config_imports_no_keras_and_the_package_reaches_every_ranker():
    code = ("import sys, experiments.config, pruning.choices\n"
            "print(bool({'keras', 'tensorflow'} & set(sys.modules)))\n"
            "from pruning import RANKERS\n"
            "print(','.join(sorted(RANKERS)))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    lines = out.stdout.split()
    assert lines[0] == "False", out.stderr
    assert {"taylor", "fpgm", "l1"} <= set(lines[1].split(",")), out.stdout  # pruning.criteria's too


def project_imports():
    """{module: project modules it imports} for experiments/, pruning/, main_train and save_sqlite:
    every import statement, at module level and inside functions, `importlib.import_module("name")`,
    and a package's lazy `_EXPORTS` table."""
    paths = {}
    for top in ("experiments", "pruning"):
        for folder, _, files in os.walk(os.path.join(REPO, top)):
            for f in files:
                if f.endswith(".py"):
                    name = os.path.relpath(os.path.join(folder, f), REPO)[:-3].replace(os.sep, ".")
                    paths[name.removesuffix(".__init__")] = os.path.join(folder, f)
    paths.update({m: os.path.join(REPO, m + ".py") for m in ("main_train", "save_sqlite")})

    def resolve(name):
        while name and name not in paths:
            name = name.rpartition(".")[0]
        return name

    graph = {}
    for module, path in paths.items():
        targets = set()
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                targets.update(f"{node.module}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "_EXPORTS" for t in node.targets):
                targets.update(f"{module}.{v}" for v in ast.literal_eval(node.value).values())
            elif isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "import_module" and \
                    node.args and isinstance(node.args[0], ast.Constant):
                targets.add(node.args[0].value)
        graph[module] = {resolve(t) for t in targets} - {"", module}
    return graph


def test_no_module_imports_itself_back():
    graph = project_imports()
    # the reader sees module-level, function-level and lazy (PEP 562, import_module) imports
    assert "experiments.choices" in graph["experiments.models"] and "pruning" in graph["experiments.config"]
    assert {"pruning.rankers", "pruning.criteria"} <= graph["pruning"]

    def on_a_cycle(module):
        seen, todo = set(), list(graph[module])
        while todo:
            m = todo.pop()
            if m == module:
                return True
            if m not in seen:
                seen.add(m)
                todo.extend(graph[m])
        return False

    cycles = sorted(m for m in graph if on_a_cycle(m))
    assert cycles == [], cycles
