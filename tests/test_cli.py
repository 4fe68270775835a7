"""The command-line tools as a user meets them: ``--help`` and a flag without its value exit through argparse
(status 0 and 2, no traceback)."""

from __future__ import annotations

import importlib

import pytest

CLIS = {  # module: a flag that takes a value
    "stp.train": "--grpo.beta",
    "stp.config": "--grpo.beta",
    "stp.eval": "--task",
    "stp.prior": "--task",
    "stp.pretrain": "--steps",
    "stp.variance": "--task",
}


@pytest.mark.parametrize("module", list(CLIS))
def test_help_exits_0_and_a_flag_without_value_exits_2(module, capsys):
    main = importlib.import_module(module).main
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr()
    assert "usage:" in out.out and "Traceback" not in out.err
    with pytest.raises(SystemExit) as info:
        main([CLIS[module]])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {CLIS[module]}" in err and "expected one argument" in err and "Traceback" not in err
    assert err.startswith("usage: python -m " + module.split(".")[0] + "." + module.split(".")[1])
