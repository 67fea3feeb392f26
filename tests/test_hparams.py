"""``lnjax.app.hparams.resolve``: which tuned table a run's model and dataset take, stated once and refused or
warned about where lnjax has tuned none (a table is never borrowed from another model or dataset)."""

import warnings

import pytest

from lnjax.app import hparams
from lnjax.world import world_model


def test_each_tuned_combination_takes_its_own_table():
    cases = [(None, "world", hparams.FAIR_TESTBED_HPARAMS), (world_model.ASSET_DIR, "world", hparams.WORLD_HPARAMS),
             ("smollm2", "zsre", hparams.MODEL_HPARAMS["smollm2"]),
             ("smollm2", "facts", hparams.MODEL_HPARAMS["smollm2"])]
    for model, dataset, table in cases:
        with warnings.catch_warnings():
            warnings.simplefilter("error")   # a tuned combination is resolved silently
            got = hparams.resolve("ultraedit", dataset=dataset, turns=20, model=model)
        assert (got["lr"], got["alpha"]) == (table["ultraedit"]["lr"], table["ultraedit"]["alpha"])
        assert hparams.tuned_table(model, dataset)[1] is table
    # the three tables disagree, so taking the wrong one would show
    assert len({hparams.FAIR_TESTBED_HPARAMS["ultraedit"]["lr"], hparams.WORLD_HPARAMS["ultraedit"]["lr"],
                hparams.MODEL_HPARAMS["smollm2"]["ultraedit"]["lr"]}) == 3


@pytest.mark.parametrize("model, dataset, editor", [
    ("smollm2", "world", "ultraedit"),               # used to get the dense world model's lr, silently
    (None, "zsre", "ultraedit"),                     # the testbed on real text
    (world_model.ASSET_DIR, "zsre", "stableedit"),
    (None, "world", "stableedit_algorithm1"),        # a table without this editor: 1e-6 is not a silent answer
])
def test_a_shipped_model_without_a_tuned_table_is_refused_unless_lr_is_given(model, dataset, editor):
    assert hparams.tuned_table(model, dataset)[0] is None or editor not in hparams.tuned_table(model, dataset)[1]
    with pytest.raises(ValueError, match=r"no tuned learning rate .*pass --lr"):
        hparams.resolve(editor, dataset=dataset, turns=20, model=model)
    got = hparams.resolve(editor, dataset=dataset, turns=20, model=model, lr=0.25)
    assert got["lr"] == 0.25 and got["alpha"] == hparams.defaults(hparams.registry_name(editor))["alpha"]


def test_another_checkpoint_gets_the_published_default_with_a_warning(tmp_path):
    path = str(tmp_path / "some-hf-checkpoint")
    with pytest.warns(UserWarning, match=r"no tuned learning rate for 'stableedit'.*published"):
        got = hparams.resolve("stableedit", dataset="zsre", turns=20, model=path)
    assert (got["lr"], got["alpha"]) == (hparams.defaults("stableedit")["lr"], hparams.defaults("stableedit")["alpha"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # an explicit lr needs no table and warns about nothing
        assert hparams.resolve("stableedit", dataset="zsre", turns=20, model=path, lr=1e-5)["lr"] == 1e-5


def test_baselines_and_meta_trained_editors_keep_their_own_settings():
    for name in ("memit", "rledit"):
        assert hparams.resolve(name, dataset="world", turns=20, model="smollm2") == \
            {"lr": None, "alpha": None, "warmup_turns": 0}
