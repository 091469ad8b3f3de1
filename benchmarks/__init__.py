"""Maintained benchmarks: each one backs a table that the README or docs/ cite.

Every benchmark runs from the repository root as `python -m benchmarks.<name> [options]`
(`--help` lists the options) and writes `results/<name>.md` unless `--output` names another
file. Each table states the machine and its load before and after the measurement
(`pruning.stats.machine_description`) and the command line that reproduces it.
"""

import os
import shlex
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import click  # noqa: E402


def command(name):
    """`click.command` of benchmark `name`, with `-h/--help` and `--output` (default
    results/<name>.md) given to the function as `output`."""
    def wrap(fn):
        fn = click.option("--output", default=os.path.join("results", f"{name}.md"), show_default=True,
                          help="Markdown file for the table.")(fn)
        return click.command(name, context_settings={"help_option_names": ["-h", "--help"]})(fn)
    return wrap


def comma_list(kind=str, choices=None):
    """A click callback that reads 'a,b,c' as [kind('a'), ...], each one of `choices` when given;
    anything else is a usage error (exit 2) before any work."""
    def parse(ctx, param, value):
        try:
            items = [kind(v) for v in value.split(",")]
        except ValueError:
            raise click.BadParameter(f"Expected comma-separated {kind.__name__} values. Received: {value!r}")
        bad = [v for v in items if choices is not None and v not in choices]
        if bad:
            raise click.BadParameter(f"Expected each of {', '.join(choices)}. Received: {', '.join(map(str, bad))}")
        return items
    return parse


def invocation(leave_out=()):
    """The command line of the running benchmark with every option's value, defaults included
    (`--output` and the parameters named in `leave_out` left out): `python -m benchmarks.<name>
    ARG --option value ...`."""
    ctx = click.get_current_context()
    parts = ["python", "-m", f"benchmarks.{ctx.command.name}"]
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if param.name == "output" or param.name in leave_out or value is None:
            continue
        if isinstance(param, click.Argument):
            parts += [str(v) for v in (value if isinstance(value, tuple) else (value,))]
        else:
            parts += [param.opts[0], ",".join(map(str, value)) if isinstance(value, list) else str(value)]
    return shlex.join(parts)


def timed(fn, *args, **kwargs):
    """(fn(*args, **kwargs), seconds it took)."""
    start = time.perf_counter()
    return fn(*args, **kwargs), time.perf_counter() - start


def machine_line(before):
    """'Machine: <before> before, <now> after; Keras x on <backend>.' for a table's caption,
    `before` being `pruning.stats.machine_description()` taken when the measurement began."""
    import keras

    from pruning.stats import machine_description

    return (f"Machine: {before} before, {machine_description()} after; Keras {keras.__version__} on "
            f"{keras.backend.backend()}.")


def write(output, lines):
    """Writes the Markdown `lines` to `output` (atomically) and prints them."""
    from experiments.files import write_text

    text = "\n".join(lines).rstrip("\n") + "\n"
    write_text(output, text)
    click.echo(text)
