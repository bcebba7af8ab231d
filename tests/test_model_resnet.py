"""DIFD with the real ResNet-101 encoder: pretrained loading, official state-dict layout, gradients, and end
to end against the naive port at 64 px (random inputs and CHAOST2 slices).

The naive port re-uses the encoder outputs of the fast run (matched image by image), so each test pays for
one ResNet-101 pass; the head comparison is exact algebra in float64 (``atol = 1e-9, rtol = 1e-7``) and
float32 end to end (``atol = 1e-4, rtol = 1e-4``; observed 3.8e-5: 512 channels, deployment logits scaled
by up to 21 and untrained 512-wide decoders amplify the float32 rounding of the prototypes).
"""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch
import torchvision
from torch import nn

from models import DIFDLoss, build_difd, load_model_weights
from models.encoder import Res101Encoder
from tests.naive_difd import F64_TOL, naive_forward
from tests.official_tree import OfficialDIFD
from utils import resolve_data_root

SIZE = 64
F32_E2E_TOL = {"atol": 1e-4, "rtol": 1e-4}
HEAD_NAMES = ["merge.0", "res1.0", "res2.0", "res2.2", "cls.0", "cls.3"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def random_encoder() -> Res101Encoder:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return Res101Encoder()


@pytest.fixture(scope="module")
def encoder() -> Res101Encoder:
    torch.manual_seed(0)
    return random_encoder().eval()


class CapturingEncoder(nn.Module):
    """Runs the real encoder (float32), records each image's outputs, returns them in ``dtype``."""

    def __init__(self, inner: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.inner = inner
        self.dtype = dtype
        self.seen: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def forward(self, x):
        feats, t = self.inner(x.float())
        self.seen += list(zip(x, feats.to(self.dtype), t.to(self.dtype), strict=True))
        return feats.to(self.dtype), t.to(self.dtype)

    def replay(self, x):
        """Outputs for a batch of images already seen (any order)."""
        rows = [next((f, t) for img, f, t in self.seen if torch.equal(img, xi)) for xi in x]
        return torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])


def naive_with_replay(model, capture, *args, **kwargs):
    shim = SimpleNamespace(
        encoder=capture.replay, fuse=model.fuse, decoder1=model.decoder1, decoder2=model.decoder2
    )
    return naive_forward(shim, *args, **kwargs)


def chaost2_episode(n_shots: int, n_queries: int):
    """Support and query slices of CHAOST2 case 1 (liver, label 1) resized to 64 px, as float32 tensors."""
    sitk = pytest.importorskip("SimpleITK")
    try:
        root = resolve_data_root()
    except FileNotFoundError as err:
        pytest.skip(f"real data absent: {err}")
    folder = root / "CHAOST2" / "chaos_MR_T2_normalized"
    if not (folder / "image_1.nii.gz").is_file():
        pytest.skip(f"CHAOST2 case 1 absent under {folder}")
    image = torch.from_numpy(sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "image_1.nii.gz")))).float()
    label = torch.from_numpy(sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "label_1.nii.gz")))).long()
    z = torch.nonzero((label == 1).flatten(1).any(1)).flatten()
    picks = z[torch.linspace(0, len(z) - 1, n_shots + n_queries).long()]
    img = nn.functional.interpolate(
        image[picks, None], size=(SIZE, SIZE), mode="bilinear", align_corners=False
    )
    img = (img - img.mean()) / img.std()
    lab = nn.functional.interpolate((label[picks, None] == 1).float(), size=(SIZE, SIZE), mode="nearest")[
        :, 0
    ]
    supp = img[:n_shots].expand(-1, 3, -1, -1)[None].contiguous()
    qry = img[n_shots:].expand(-1, 3, -1, -1)[None].contiguous()
    return supp, lab[:n_shots][None], qry, lab[n_shots:][None].long()


def test_chaost2_end_to_end_float32(encoder):
    supp, masks, qry, _ = chaost2_episode(3, 2)
    assert masks.sum() > 0
    capture = CapturingEncoder(encoder, torch.float32)
    torch.manual_seed(1)
    model = build_difd(encoder=capture).eval()
    with torch.no_grad():
        out = model(supp, masks, qry, align=False)
        ref_q, _ = naive_with_replay(model, capture, supp, masks, qry, False)
    torch.testing.assert_close(out.query_probs, ref_q, **F32_E2E_TOL)


@pytest.mark.parametrize("source", ["random", "chaost2"])
def test_end_to_end_float64_head_with_alignment(encoder, source):
    if source == "chaost2":
        supp, masks, qry, _ = chaost2_episode(1, 1)
    else:
        gen = torch.Generator().manual_seed(5)
        supp = torch.randn(1, 1, 3, SIZE, SIZE, generator=gen)
        qry = torch.randn(1, 1, 3, SIZE, SIZE, generator=gen)
        masks = torch.zeros(1, 1, SIZE, SIZE)
        masks[0, 0, :5, -7:] = 1  # tiny, touching the border
    capture = CapturingEncoder(encoder, torch.float64)
    torch.manual_seed(1)
    model = build_difd(encoder=capture, decoder_extra_maps=source == "random")
    model.fuse.double(), model.decoder1.double(), model.decoder2.double()
    model.eval()
    supp, masks, qry = supp.double(), masks.double(), qry.double()
    with torch.no_grad():
        out = model(supp, masks, qry, align=True)
        ref_q, ref_s = naive_with_replay(
            model, capture, supp, masks, qry, True, extra_maps=source == "random"
        )
    torch.testing.assert_close(out.query_probs, ref_q, **F64_TOL)
    assert torch.equal(out.align_valid, torch.tensor([r is not None for r in ref_s]))
    for e, ref in enumerate(ref_s):
        if ref is not None:
            torch.testing.assert_close(out.support_probs[e], ref, **F64_TOL)


def test_gradients_reach_every_parameter_but_reduce2(encoder):
    torch.manual_seed(2)
    model = build_difd(encoder=encoder).train()
    gen = torch.Generator().manual_seed(6)
    supp = torch.randn(1, 1, 3, SIZE, SIZE, generator=gen)
    qry = torch.randn(1, 1, 3, SIZE, SIZE, generator=gen)
    masks = torch.zeros(1, 1, SIZE, SIZE)
    masks[0, 0, 16:48, 8:40] = 1
    labels = masks.long()
    model.zero_grad(set_to_none=True)
    try:
        DIFDLoss()(model(supp, masks, qry), labels, masks)["total"].backward()
        for name, p in model.named_parameters():
            if name.startswith("encoder.reduce2."):
                assert p.grad is None, "reduce2 is kept for checkpoints but never computed"
                continue
            assert p.grad is not None, name
            assert torch.isfinite(p.grad).all(), name
            assert p.grad.abs().sum() > 0, name
    finally:
        encoder.eval().zero_grad(set_to_none=True)


def official_layout(in_channels: int) -> dict[str, torch.Tensor]:
    """A state dict with the official module tree's names and shapes (method.md §6), random values: the
    parameters method.md §6 lists, every BatchNorm buffer of the trunk, and the loss's
    ``criterion.weight``."""
    gen = torch.Generator().manual_seed(0)
    trunk = torchvision.models.resnet101(weights=None).state_dict()
    state = {
        f"encoder.backbone.{k}": torch.randn(v.shape, generator=gen) if v.is_floating_point() else v
        for k, v in trunk.items()
    }
    shapes = {
        "encoder.reduce1.weight": (512, 1024, 1, 1),
        "encoder.reduce2.weight": (512, 2048, 1, 1),
        "encoder.reduce1d.weight": (1, 1000),
        "encoder.reduce1d.bias": (1,),
        "fuse.weight": (1, 2, 1, 1),
    }
    for dec in ("decoder1", "decoder2"):
        shapes |= {
            f"{dec}.merge.0.weight": (512, in_channels, 1, 1),
            f"{dec}.res1.0.weight": (512, 512, 1, 1),
            f"{dec}.res2.0.weight": (512, 512, 3, 3),
            f"{dec}.res2.2.weight": (512, 512, 3, 3),
            f"{dec}.cls.0.weight": (512, 512, 3, 3),
            f"{dec}.cls.3.weight": (1, 512, 1, 1),
        }
    state |= {k: torch.randn(s, generator=gen) for k, s in shapes.items()}
    state["criterion.weight"] = torch.tensor([0.1, 1.0])
    return state


@pytest.fixture(scope="module")
def official_tree() -> OfficialDIFD:
    torch.manual_seed(3)
    return OfficialDIFD(decoder_in=1027)


def test_spec_layout_is_the_official_module_tree(official_tree):
    tree = official_tree.state_dict()
    layout = official_layout(1027)
    assert sorted(layout) == sorted(tree)
    assert all(tuple(layout[k].shape) == tuple(tree[k].shape) for k in tree)
    assert "criterion.weight" in tree and "encoder.backbone.bn1.running_var" in tree


def test_official_checkpoints_load_through_the_checkpoint_loader(tmp_path, official_tree):
    """What the official training saves (the whole tree's state_dict) loads strictly into our model: the
    released 2C+3 decoders with decoder_extra_maps=True (and into a 2C+1 model not, with the hint), 2C+1
    decoders by default."""
    torch.manual_seed(4)
    trees = {True: official_tree, False: OfficialDIFD(decoder_in=1025, encoder=official_tree.encoder)}
    for extra_maps, tree in trees.items():
        state = tree.state_dict()
        torch.save(state, tmp_path / f"official_{extra_maps}.pth")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            model = build_difd(decoder_extra_maps=extra_maps)
        assert set(model.state_dict()) == set(state) - {"criterion.weight"}
        loaded = load_model_weights(model, tmp_path / f"official_{extra_maps}.pth")
        assert loaded.kind == "state_dict" and loaded.dropped == ["criterion.weight"]
        for key, value in model.state_dict().items():
            assert torch.equal(value, state[key]), key
    with pytest.raises(ValueError, match=r"2C\+3 \(1027-channel\).*decoder_extra_maps=True"):
        load_model_weights(model, tmp_path / "official_True.pth")


def test_pretrained_loading(tmp_path, caplog):
    source = torchvision.models.resnet101(weights=None).state_dict()
    keep = [k for k in source if k.startswith(("conv1.", "bn1.", "layer1.0.", "fc."))]
    resnet_file = tmp_path / "resnet101.pth"
    torch.save({k: source[k] for k in keep}, resnet_file)
    deeplab_file = tmp_path / "deeplabv3.pth"
    deeplab = {f"backbone.{k}": source[k] for k in keep if not k.startswith("fc.")}
    deeplab["classifier.4.weight"] = torch.zeros(21, 256, 1, 1)
    torch.save(deeplab, deeplab_file)

    with caplog.at_level("INFO", logger="models.encoder"):
        enc = Res101Encoder("resnet101", resnet_file)
    report = enc.pretrained_report
    assert report.loaded == len(keep) and "backbone.fc.weight" not in report.random
    assert "backbone.layer2.0.conv1.weight" in report.random and "reduce1d.weight" in report.random
    torch.testing.assert_close(enc.backbone["fc"].weight, source["fc.weight"])
    assert str(resnet_file) in caplog.text

    enc = Res101Encoder("deeplabv3", deeplab_file)
    report = enc.pretrained_report
    assert report.loaded == len(keep) - 2 and "backbone.fc.weight" in report.random
    assert report.ignored == ["classifier.4.weight"]
    torch.testing.assert_close(enc.backbone["conv1"].weight, source["conv1.weight"])

    with pytest.raises(FileNotFoundError, match="missing.pth"):
        Res101Encoder("deeplabv3", tmp_path / "missing.pth")
    with pytest.raises(ValueError, match=str(deeplab_file)):
        Res101Encoder("resnet101", deeplab_file)  # prefixed keys: nothing matches
    with pytest.raises(ValueError, match="pretrained_path"):
        Res101Encoder("deeplabv3", None)
    with pytest.raises(ValueError, match="pretrained_weights"):
        Res101Encoder("imagenet", resnet_file)
    with pytest.warns(UserWarning, match="randomly initialised"):
        Res101Encoder(None)
