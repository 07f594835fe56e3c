"""Frozen feature extraction on real CIFAR-10 rows: shapes, labels, batch invariance, the cache."""

import pytest
import torch

from hf_sslbd.backbones import build_backbone
from hf_sslbd.evaluation.features import (
    dataset_fingerprint,
    extract_features,
    model_fingerprint,
    uses_channels_last,
)
from hf_sslbd.preprocessing import Preprocessing


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def rows(cifar10):
    return cifar10["test"].select(range(48))


@pytest.fixture()
def model():
    torch.manual_seed(0)
    return build_backbone("resnet10-cifar", width=8)


def test_features_and_labels(rows, model):
    model.train()
    out = extract_features(model, Preprocessing(), rows, batch_size=20, progress=False)
    assert out.features.shape == (48, 64) and out.features.dtype == torch.float32
    assert out.labels.tolist() == rows["label"]
    assert model.training  # mode restored
    # row order and values do not depend on the batch size
    other = extract_features(model, Preprocessing(), rows, batch_size=7, channels_last=False, progress=False)
    assert torch.allclose(out.features, other.features, atol=1e-5)
    # and match a direct forward pass of the same pixels
    from hf_sslbd.backbones import pooled_features
    from hf_sslbd.preprocessing import images_to_batch, normalize

    pixels = normalize(
        images_to_batch(rows[:5]["img"], Preprocessing()), Preprocessing().mean, Preprocessing().std
    )
    with torch.no_grad():
        direct = pooled_features(model.eval(), pixels)
    assert torch.allclose(out.features[:5], direct, atol=1e-5)


def test_cache_is_read_back_and_keyed_by_model(rows, model, tmp_path):
    first = extract_features(model, Preprocessing(), rows, cache_dir=tmp_path, progress=False)
    files = list(tmp_path.glob("features-*.safetensors"))
    assert len(files) == 1

    def broken_forward(*args, **kwargs):
        raise AssertionError("the cache should have answered")

    original = model.forward
    model.forward = broken_forward
    again = extract_features(model, Preprocessing(), rows, cache_dir=tmp_path, progress=False)
    assert torch.equal(first.features, again.features) and torch.equal(first.labels, again.labels)
    model.forward = original

    with torch.no_grad():  # new weights: a new key, new features
        next(model.parameters()).add_(1.0)
    changed = extract_features(model, Preprocessing(), rows, cache_dir=tmp_path, progress=False)
    assert len(list(tmp_path.glob("features-*.safetensors"))) == 2
    assert not torch.allclose(changed.features, first.features)
    # other rows or other preprocessing: other keys
    extract_features(model, Preprocessing(), rows.select(range(10)), cache_dir=tmp_path, progress=False)
    extract_features(
        model, Preprocessing(mean=[0.5] * 3, std=[0.5] * 3), rows, cache_dir=tmp_path, progress=False
    )
    assert len(list(tmp_path.glob("features-*.safetensors"))) == 4


def test_cache_follows_the_rows_not_their_folder(rows, model, tmp_path):
    """The same rows read back from a parquet folder (another ``_fingerprint``), with an extra
    column, hit the cache; a changed image misses it."""
    import datasets

    folder = tmp_path / "data"
    folder.mkdir()
    rows.to_parquet(str(folder / "test.parquet"))
    first = extract_features(model, Preprocessing(), rows, cache_dir=tmp_path / "cache", progress=False)
    reread = datasets.load_dataset("parquet", data_files=str(folder / "test.parquet"), split="train")
    reread = reread.cast(rows.features).add_column("note", ["x"] * rows.num_rows)
    assert reread._fingerprint != rows._fingerprint

    def broken_forward(*args, **kwargs):
        raise AssertionError("the cache should have answered")

    original, model.forward = model.forward, broken_forward
    again = extract_features(model, Preprocessing(), reread, cache_dir=tmp_path / "cache", progress=False)
    model.forward = original
    assert torch.equal(first.features, again.features)
    flipped = rows.map(lambda row: {"img": row["img"].transpose(0)}, load_from_cache_file=False)
    extract_features(model, Preprocessing(), flipped, cache_dir=tmp_path / "cache", progress=False)
    assert len(list((tmp_path / "cache").glob("features-*.safetensors"))) == 2


def test_fingerprints(rows, model):
    assert model_fingerprint(model) == model_fingerprint(model)
    twin = build_backbone("resnet10-cifar", width=8)
    assert model_fingerprint(twin) != model_fingerprint(model)
    twin.load_state_dict(model.state_dict())
    assert model_fingerprint(twin) == model_fingerprint(model)
    assert dataset_fingerprint(rows) != dataset_fingerprint(rows.select(range(10)))
    assert uses_channels_last(model) and not uses_channels_last(build_backbone("vit-tiny", image_size=32))


def test_bad_input(rows, model, cifar10):
    with pytest.raises(TypeError, match="one split"):
        extract_features(model, Preprocessing(), cifar10, progress=False)
    with pytest.raises(ValueError, match="image column 'pixels' not found"):
        extract_features(model, Preprocessing(), rows, image_column="pixels", progress=False)
    with pytest.raises(ValueError, match="unknown precision"):
        extract_features(model, Preprocessing(), rows, precision="int8", progress=False)
    vit = build_backbone("vit-tiny", image_size=224)
    with pytest.raises(ValueError, match="takes 224 px images"):
        extract_features(vit, Preprocessing(image_size=32), rows, progress=False)


def test_unlabeled_split(rows, model):
    out = extract_features(model, Preprocessing(), rows.remove_columns("label"), progress=False)
    assert out.labels is None and out.features.shape == (48, 64)


def test_content_fingerprint_reads_values_not_layout(rows):
    """Same values in another Arrow layout (chunks, large_binary, an index mapping) hash alike;
    one changed label or byte does not."""
    import datasets
    import pyarrow as pa

    from hf_sslbd.data import content_fingerprint

    table = rows.with_format("arrow")[:]
    image = table.column("img").combine_chunks()
    wide = pa.StructArray.from_arrays(
        [image.field("bytes").cast(pa.large_binary()), image.field("path").cast(pa.large_string())],
        names=["bytes", "path"],
    )
    chunked = pa.table({"img": pa.chunked_array([wide[:20], wide[20:]]), "label": table.column("label")})
    relaid = datasets.Dataset(chunked)
    assert relaid.data.column("img").num_chunks == 2 and relaid.data.schema.field("img").type == wide.type
    assert content_fingerprint(relaid) == content_fingerprint(rows)
    assert content_fingerprint(rows.flatten_indices()) == content_fingerprint(rows)
    relabelled = rows.map(lambda row, i: {"label": (row["label"] + (i == 7)) % 10}, with_indices=True)
    assert content_fingerprint(relabelled) != content_fingerprint(rows)
    assert content_fingerprint(rows.select(range(1, 48))) != content_fingerprint(rows.select(range(47)))
