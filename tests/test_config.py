import pytest

from fct_dist import config
from fct_dist.config import ConfigError


def test_config_yaml_equals_embedded_defaults():
    assert config.load("config.yaml") == config.load(None)


def test_every_key_of_config_yaml_is_documented():
    """Each key name carries a comment where it first appears (siblings repeat it without one)."""
    documented, seen = set(), set()
    for line in open("config.yaml"):
        body, _, comment = line.partition("#")
        if ":" in body and not body.lstrip().startswith("#"):
            key = body.split(":")[0].strip()
            seen.add(key)
            if comment.strip():
                documented.add(key)
    assert seen - documented == set()


def test_overrides_and_preset_apply():
    cfg = config.load("config.yaml", ["train.num_workers=1", "models.old.blocks=[2, 2]", "storage.root=s3://b/p"],
                      preset="tiny")
    assert cfg.train.num_workers == 1
    assert cfg.models.old.blocks == [2, 2]
    assert cfg.storage.root == "s3://b/p"
    assert cfg.data.source == "synthetic"  # from the preset
    assert cfg.train.old.lr == 0.1  # untouched keys keep their defaults


@pytest.mark.parametrize("override, message", [
    ("train.nope=1", "unknown key train.nope; allowed keys here: num_workers"),
    ("nope.x=1", "unknown key nope;"),
    ("train.num_workers=two", "train.num_workers: 'two' has type str; expected int"),
    ("train.num_workers=-1", "train.num_workers: -1 is out of range; allowed 0 .. 4096"),
    ("train.old.lr=true", "train.old.lr: True has type bool; expected float"),
    ("data.source=imagenet", "data.source: 'imagenet' is not allowed; expected one of 'demo', 'synthetic', 'folder'"),
    ("models.old.blocks=[1, x]", "models.old.blocks[1]: 'x' has type str; expected int"),
    ("storage=3", "storage: expected a section (mapping), got 3"),
    ("train.num_workers", "--set 'train.num_workers': expected key=value"),
    ("versions.classes=[6, null, null]", "versions.classes: [6, None, None]; expected one entry per version"),
    ("versions.classes=[6, 6]", "versions.classes: [6, 6]; expected one entry per version"),
    ("versions.classes=[8, 6]", "versions.classes: [8, 6]; expected one entry per version"),
    ("versions.classes=[]", "versions.classes: []; expected one entry per version"),
    ("versions.classes=[0]", "versions.classes[0]: 0 is out of range"),
])
def test_bad_values_fail_with_the_key_and_what_is_allowed(override, message):
    with pytest.raises(ConfigError) as e:
        config.load("config.yaml", [override])
    assert message in str(e.value)


def test_bad_files_and_presets(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml is not valid YAML"):
        config.load(bad)
    with pytest.raises(ConfigError, match="cannot read config file"):
        config.load(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="unknown preset 'huge'; allowed: tiny"):
        config.load(None, preset="huge")


def test_int_is_accepted_where_a_float_is_expected():
    assert config.load(None, ["train.old.lr=1"]).train.old.lr == 1.0


def test_the_cli_says_its_version_its_defaults_and_refuses_zero_seeds(capsys):
    import fct_dist
    from fct_dist import cli
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"fct {fct_dist.__version__}"
    from importlib.metadata import version
    assert fct_dist.__version__ == version("fct-dist")  # one version: pyproject reads it from the package
    with pytest.raises(SystemExit):
        cli.main(["search", "--help"])
    assert "neighbours per query (default: 10)" in " ".join(capsys.readouterr().out.split())
    for bad in ("0", "-2"):
        with pytest.raises(SystemExit) as e:
            cli.main(["upgrade", "--seeds", bad])
        assert e.value.code == 2 and f"argument --seeds: {bad} is not a positive integer" in capsys.readouterr().err


def test_a_missing_faiss_names_the_extra_to_install(tmp_path, monkeypatch, capsys):
    import sys
    import fct_dist.pipeline
    from fct_dist import cli
    monkeypatch.setitem(sys.modules, "faiss", None)  # what `import faiss` meets where faiss is not installed
    monkeypatch.delitem(sys.modules, "fct_dist.pipeline.index", raising=False)
    monkeypatch.delattr(fct_dist.pipeline, "index", raising=False)
    assert cli.main(["index", "--preset", "tiny", "--set", f"storage.root={tmp_path}"]) == 2
    assert "needs the faiss package, which is not installed: pip install 'fct-dist[cpu]'" in capsys.readouterr().err
