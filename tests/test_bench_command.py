"""``influencerformer bench``: the real benchmark (not a stand-in) through the command line, and its --help."""
import importlib.util
from pathlib import Path

from influencerformer import cli

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "loss_speed.py"


def test_bench_quick_runs_the_real_benchmark_and_exits_0(capsys):
    # regression: main() returns its rows, which cmd_bench passed to int() -> TypeError after the table
    assert cli.main(["bench", "--", "--quick", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "random inputs:" in out and "peaked inputs:" in out
    assert out.count("| 16 | 4 | ") == 2 and "transport 0/" in out  # no subnormal transport gradient


def test_bench_help_names_the_command_and_explains_every_option(capsys):
    assert cli.main(["bench", "--", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert text.startswith("usage: influencerformer bench --")
    spec = importlib.util.spec_from_file_location("loss_speed_for_help", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    options = [a for a in module.build_parser()._actions if a.option_strings and a.dest != "help"]
    assert len(options) >= 13
    for action in options:
        assert action.help and len(action.help) > 10, action.dest
        assert action.option_strings[0] in text
    assert text.count("(default:") >= len(options)


def test_bench_bad_option_exits_2(capsys):
    assert cli.main(["bench", "--", "--case", "nope"]) == 2
    assert "invalid choice: 'nope'" in capsys.readouterr().err
