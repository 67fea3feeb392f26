"""``lnjax run``'s options are derived from ``RunConfig``'s fields: one default, one help text, per field."""

import dataclasses

from lnjax.app.cli import build_parser, config_from_args
from lnjax.app.run import RunConfig


def _run_parser():
    ap = build_parser()
    return next(a for a in ap._subparsers._group_actions[0].choices.values() if a.prog.endswith(" run"))


def test_no_flags_give_the_default_config_and_every_field_is_an_option():
    assert config_from_args(build_parser().parse_args(["run"])) == RunConfig()
    text = _run_parser().format_help()
    for f in dataclasses.fields(RunConfig):
        flag = f.metadata["cli"].get("flag") or ("--no-" if f.default is True else "--") + f.name.replace("_", "-")
        assert flag in text, flag


def test_flags_set_their_fields():
    argv = ["run", "--editor", "ultraedit,stableedit", "--turns", "3", "--lr", "0.5", "--targets", "a.b, c.d",
            "--no-generation", "--strict", "--editor-options", '{"whiten": false}', "--warmup-at", "middle",
            "--max-length", "64", "--minibatch-size", "4"]
    cfg = config_from_args(build_parser().parse_args(argv))
    assert cfg == RunConfig(editors=("ultraedit", "stableedit"), turns=3, lr=0.5, targets=("a.b", "c.d"),
                            generation=False, strict=True, editor_options={"whiten": False}, warmup_at="middle",
                            max_length=64, minibatch_size=4)
    assert isinstance(cfg.turns, int) and isinstance(cfg.lr, float)
