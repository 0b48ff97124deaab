"""The network: shapes per backbone, pretrained mapping, first-conv widening, SPM gradients, PEM."""
import pytest
import torch

from model.backbones import FEATURE_CHANNELS, build_backbone, lite2_weights_path, load_lite2_imagenet
from model.clicks import disk_maps, sample_at_clicks
from model.config import ModelConfig
from model.network import InteractiveSegNet
from model.pem import PrototypeLoss
from model.spm import SPM


def pack_clicks(click_lists) -> torch.Tensor:
    """[[(y, x, positive), ...], ...] -> (B, M, 3) clicks padded with sign 0 (M >= 1): the network's
    click tensor, written by hand."""
    m = max(1, max((len(c) for c in click_lists), default=0))
    out = torch.zeros(len(click_lists), m, 3, dtype=torch.float32)
    for i, cl in enumerate(click_lists):
        for j, (y, x, pos) in enumerate(cl):
            out[i, j] = torch.tensor([y, x, 1.0 if pos else -1.0])
    return out


@pytest.mark.parametrize("backbone", ["efficientnet-lite2", "resnet50", "resnet101"])
def test_shapes_and_dtypes_per_backbone(backbone):
    torch.manual_seed(0)
    net = InteractiveSegNet(ModelConfig(backbone=backbone)).eval()
    image = torch.rand(2, 3, 96, 128)
    clicks = pack_clicks([[(40, 50, True)], [(10, 20, True), (60, 70, False)]])
    prev = torch.zeros(2, 1, 96, 128)
    with torch.inference_mode():
        out = net(image, clicks, prev, return_features=True)
    assert out.logits.shape == (2, 1, 96, 128) and out.logits.dtype == torch.float32
    assert out.features.shape == (2, ModelConfig().decoder_channels, 24, 32)
    assert out.click_feats.shape == (2, 2, ModelConfig().decoder_channels)
    assert torch.isfinite(out.logits).all()
    s2, low, high = net.backbone(torch.rand(1, 6, 64, 64))
    assert (low.shape[1], high.shape[1]) == FEATURE_CHANNELS[backbone]
    assert s2.shape[-1] == 32 and low.shape[-1] == 16 and high.shape[-1] == 4  # strides 2, 4 and 16


def test_input_size_must_be_multiple_of_16():
    net = InteractiveSegNet(ModelConfig()).eval()
    with pytest.raises(ValueError, match="multiple of 16"):
        net(torch.rand(1, 3, 50, 64), pack_clicks([[(5, 5, True)]]), torch.zeros(1, 1, 50, 64))


def test_lite2_pretrained_mapping_fills_every_tensor_strictly():
    backbone = build_backbone("efficientnet-lite2", pretrained=False)
    body = backbone.body
    stem = body.conv_stem
    # Undo the widening so the file's 3-channel stem fits, then load and check the count.
    stem.weight = torch.nn.Parameter(stem.weight.data[:, :3].clone())
    n = load_lite2_imagenet(body)
    assert n == len(body.state_dict()) == 378
    src = torch.load(lite2_weights_path(), map_location="cpu", weights_only=True)
    assert torch.equal(body.conv_stem.weight, src["_conv_stem.weight"])
    assert torch.equal(body.blocks[6][0].conv_pwl.weight, src["_blocks.20._project_conv.weight"])


def test_first_conv_widened_rgb_copied_extra_zero():
    src = torch.load(lite2_weights_path(), map_location="cpu", weights_only=True)["_conv_stem.weight"]
    w = build_backbone("efficientnet-lite2", pretrained=True).first_conv().weight
    assert w.shape == (32, 6, 3, 3)
    assert torch.equal(w[:, :3], src)
    assert torch.count_nonzero(w[:, 3:]) == 0


def test_resnet_has_no_offline_imagenet_weights():
    with pytest.raises(ValueError, match="no ImageNet weights"):
        build_backbone("resnet50", pretrained=True)


def test_click_disks_at_the_right_pixels():
    clicks = pack_clicks([[(10, 20, True), (30, 5, False)]])
    maps = disk_maps(clicks, 40, 40, radius=5)
    ys, xs = torch.meshgrid(torch.arange(40), torch.arange(40), indexing="ij")
    pos = ((ys - 10) ** 2 + (xs - 20) ** 2) <= 25
    neg = ((ys - 30) ** 2 + (xs - 5) ** 2) <= 25
    assert torch.equal(maps[0, 0].bool(), pos)
    assert torch.equal(maps[0, 1].bool(), neg)
    assert maps[0, 0, 10, 20] == 1 and maps[0, 0, 10, 26] == 0 and maps[0, 0, 10, 25] == 1


def test_padding_clicks_draw_nothing():
    clicks = pack_clicks([[(10, 10, True)], []])
    maps = disk_maps(clicks, 20, 20, radius=3)
    assert maps[1].sum() == 0 and maps[0, 0].sum() > 0


def test_sample_at_clicks_reads_the_feature_under_the_click():
    feat = torch.zeros(1, 1, 8, 8)
    feat[0, 0, 2, 5] = 1.0  # stride 4: covers input pixels y 8..11, x 20..23
    v = sample_at_clicks(feat, pack_clicks([[(9.5, 21.5, True), (30, 2, True)]]), (32, 32))
    assert v[0, 0, 0] == pytest.approx(1.0) and v[0, 1, 0] == 0


@pytest.mark.parametrize("mode", ["all", "split"])
def test_gradients_reach_spm(mode):
    torch.manual_seed(0)
    net = InteractiveSegNet(ModelConfig(spm_mode=mode)).train()
    image = torch.rand(2, 3, 64, 64)
    clicks = pack_clicks([[(20, 20, True), (50, 50, False)], [(30, 30, True)]])
    out = net(image, clicks, torch.zeros(2, 1, 64, 64))
    out.logits.mean().backward()
    for name, p in net.spm.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        if "sign_embed" not in name:
            assert p.grad.abs().sum() > 0, name


def test_spm_switch_off_removes_module():
    net = InteractiveSegNet(ModelConfig(spm=False))
    assert net.spm is None
    assert not any(k.startswith("spm.") for k in net.state_dict())


def test_spm_picks_most_and_least_similar_click():
    spm = SPM(2).eval()
    with torch.no_grad():
        spm.sign_embed.weight.zero_()
    feat = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).T.reshape(1, 2, 1, 2)  # pixel0 = e0, pixel1 = e1
    f = torch.tensor([[[1.0, 0.1], [0.1, 1.0]]])                    # click0 ~ e0, click1 ~ e1
    sim_near = spm._gather(f, torch.einsum("bmc,bcn->bmn", f, feat.flatten(2)))
    assert torch.equal(sim_near[0, 0], f[0, 0]) and torch.equal(sim_near[0, 1], f[0, 1])


def test_pem_is_training_only():
    net = InteractiveSegNet(ModelConfig())
    assert not any(isinstance(m, PrototypeLoss) for m in net.modules())
    assert not any("pro_pos" in k or "pem" in k for k in net.state_dict())


def test_pem_loss_and_ema_prototype():
    torch.manual_seed(0)
    pem = PrototypeLoss(4, beta=0.5)
    feat = torch.rand(2, 4, 8, 8, requires_grad=True)
    gt = torch.zeros(2, 1, 32, 32)
    gt[:, :, :16] = 1
    clicks = pack_clicks([[(4, 4, True), (28, 28, False)], [(5, 5, True)]])
    cf = sample_at_clicks(feat, clicks, (32, 32))
    loss = pem(feat, gt, cf, clicks[..., 2])
    assert loss.ndim == 0 and loss > 0
    loss.backward()
    assert feat.grad.abs().sum() > 0
    first = pem.pro_pos.clone()
    fg = (feat.detach()[:, :, :4] ).mean((2, 3)).mean(0)
    assert torch.allclose(first, fg, atol=1e-5)      # initialised to the first batch prototype
    pem(feat.detach() * 0 + 1, gt, cf.detach(), clicks[..., 2])
    assert torch.allclose(pem.pro_pos, 0.5 * first + 0.5 * torch.ones(4), atol=1e-5)  # eq. 15 EMA


@pytest.mark.parametrize("backbone", ["efficientnet-lite2", "resnet50"])
def test_batchnorm_folding_keeps_the_output(backbone):
    from model.fold import fold_batchnorm

    torch.manual_seed(0)
    net = InteractiveSegNet(ModelConfig(backbone=backbone)).train()
    with torch.no_grad():  # non-trivial running statistics
        for _ in range(2):
            net(torch.rand(4, 3, 64, 64), pack_clicks([[(10, 10, True)]] * 4), torch.zeros(4, 1, 64, 64))
    net.eval()
    folded = fold_batchnorm(net)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())  # the original is untouched
    x, c, p = torch.rand(1, 3, 96, 128), pack_clicks([[(40, 50, True), (10, 10, False)]]), torch.zeros(1, 1, 96, 128)
    with torch.inference_mode():
        assert torch.allclose(net(x, c, p).logits, folded(x, c, p).logits, atol=1e-4)


def test_proximity_maps_decay_with_distance_per_sign():
    from model.clicks import proximity_maps
    clicks = pack_clicks([[(8, 8, True), (56, 56, False)], []])
    maps = proximity_maps(clicks, (64, 64), (16, 16), falloff=0.25)
    assert maps.shape == (2, 2, 16, 16)
    # cell (2, 2) covers input pixels 8..11: its centre (9.5, 9.5) is 1.5*sqrt(2) px from the click
    d = 1.5 * 2 ** 0.5
    assert maps[0, 0, 2, 2].item() == pytest.approx(torch.exp(torch.tensor(-d / 16.0)).item(), rel=1e-5)
    assert maps[0, 0, 2, 2] > maps[0, 0, 8, 8] > maps[0, 0, 15, 15]     # farther from the positive click
    assert maps[0, 1, 15, 15] > maps[0, 1, 0, 0]                        # negative channel: its own click
    assert maps[1].sum() == 0                                           # no clicks, no signal


def test_late_fusion_gives_the_decoder_the_clicks():
    torch.manual_seed(0)
    net = InteractiveSegNet(ModelConfig(late_fusion=True, spm=False)).eval()
    assert net.decoder[0][0].in_channels == ModelConfig().aspp_channels + 48 + 5
    with torch.no_grad():   # the backbone's click/mask channels as at the start of training: zero
        net.backbone.first_conv().weight[:, 3:] = 0
    image, prev = torch.rand(1, 3, 64, 64), torch.zeros(1, 1, 64, 64)
    with torch.inference_mode():
        a = net(image, pack_clicks([[(20, 20, True)]]), prev).logits
        b = net(image, pack_clicks([[(20, 20, False)]]), prev).logits
        c = net(image, pack_clicks([[(44, 44, True)]]), prev).logits
    # With no SPM and a blind backbone, only the late path can tell these clicks apart.
    assert not torch.allclose(a, b) and not torch.allclose(a, c)


def test_late_fusion_backbone_sees_the_image_alone_and_the_code_is_reusable():
    torch.manual_seed(0)
    net = InteractiveSegNet(ModelConfig(fusion="late", aspp_channels=32, decoder_channels=32)).eval()
    assert net.backbone.first_conv().weight.shape[1] == 3   # RGB only: clicks enter the head
    image, prev = torch.rand(1, 3, 64, 96), torch.zeros(1, 1, 64, 96)
    one = pack_clicks([[(20, 30, True)]])
    two = pack_clicks([[(20, 30, True), (40, 70, False)]])
    with torch.inference_mode():
        code = net.encode(image)
        a = net.decode(code, one, prev).logits
        b = net.decode(code, two, prev).logits
        assert torch.allclose(a, net(image, one, prev).logits, atol=1e-5)   # forward = encode + decode
        assert not torch.allclose(a, b)                                    # a second click changes the answer
        # one image code serves a batch of click sets
        batch = net.decode(code, torch.cat([pack_clicks([[(20, 30, True), (-1, -1, 0)]]), two]), prev.expand(2, -1, -1, -1))
    assert torch.allclose(batch.logits[1:], b, atol=1e-5)
    assert a.shape == (1, 1, 64, 96)


def test_late_fusion_head_tells_clicks_apart_through_every_stride():
    torch.manual_seed(0)
    net = InteractiveSegNet(ModelConfig(fusion="late", spm=False, aspp_channels=32, decoder_channels=32)).eval()
    image, prev = torch.rand(1, 3, 64, 64), torch.zeros(1, 1, 64, 64)
    with torch.inference_mode():
        code = net.encode(image)
        a = net.decode(code, pack_clicks([[(20, 20, True)]]), prev).logits
        b = net.decode(code, pack_clicks([[(20, 20, False)]]), prev).logits
        c = net.decode(code, pack_clicks([[(20, 20, True)]]), torch.ones(1, 1, 64, 64)).logits
    assert not torch.allclose(a, b) and not torch.allclose(a, c)   # the sign and the previous mask both count


def test_boundary_head_starts_as_the_identity_and_learns():
    torch.manual_seed(0)
    cfg = ModelConfig(fusion="late", boundary_head=True, aspp_channels=32, decoder_channels=32)
    net = InteractiveSegNet(cfg).eval()
    image, prev, clicks = torch.rand(1, 3, 64, 64), torch.zeros(1, 1, 64, 64), pack_clicks([[(20, 20, True)]])
    with torch.inference_mode():
        out = net(image, clicks, prev)
    up = torch.nn.functional.interpolate(
        torch.nn.functional.interpolate(out.coarse_logits, size=(32, 32), mode="bilinear", align_corners=False),
        size=(64, 64), mode="bilinear", align_corners=False)
    assert torch.allclose(out.logits, up, atol=1e-5)   # zero-initialised correction
    net.train()   # batch of 2: BatchNorm in training mode needs more than one value per channel
    net(image.expand(2, -1, -1, -1), clicks.expand(2, -1, -1), prev.expand(2, -1, -1, -1)).logits.sum().backward()
    assert net.fine[-1].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("fusion", ["late", "early"])
def test_box_input_model_segments_from_a_box_alone(fusion):
    torch.manual_seed(0)
    net = InteractiveSegNet(ModelConfig(fusion=fusion, box_input=True, late_fusion=fusion == "early",
                                        aspp_channels=32, decoder_channels=32)).eval()
    if fusion == "early":   # a new input starts at zero (widen_first_conv): give the box channel a voice
        with torch.no_grad():
            net.backbone.first_conv().weight[:, -1] = 1.0
    image, prev = torch.rand(1, 3, 64, 64), torch.zeros(1, 1, 64, 64)
    no_click = torch.tensor([[[-1.0, -1.0, 0.0]]])
    with torch.inference_mode():
        code = net.encode(image)
        a = net.decode(code, no_click, prev, torch.tensor([[8.0, 8.0, 30.0, 30.0]])).logits
        b = net.decode(code, no_click, prev, torch.tensor([[30.0, 30.0, 60.0, 60.0]])).logits
        c = net.decode(code, no_click, prev).logits                 # no box at all
    assert torch.isfinite(a).all() and not torch.allclose(a, b) and not torch.allclose(a, c)
    with pytest.raises(ValueError, match="no box prompt"):
        InteractiveSegNet(ModelConfig(fusion="late", aspp_channels=32, decoder_channels=32)).eval().decode(
            code, no_click, prev, torch.tensor([[8.0, 8.0, 30.0, 30.0]]))


def test_grow_teaches_a_trained_network_a_box_input_read_as_a_previous_mask():
    """model.network.grow: without a box the grown network answers exactly as before; a box alone
    is first read as the network reads a previous mask of the box's shape (its channel starts as a
    copy of the previous mask's), and training moves it from there. Other new inputs start at zero."""
    from model.clicks import box_maps
    from model.network import grow

    torch.manual_seed(0)
    small = dict(aspp_channels=32, decoder_channels=32)
    for base in (ModelConfig(**small), ModelConfig(**small, late_fusion=True)):
        net = InteractiveSegNet(base).eval()
        grown = grow(net, ModelConfig.from_dict({**base.to_dict(), "box_input": True})).eval()
        assert grown.backbone.first_conv().weight.shape[1] == net.backbone.first_conv().weight.shape[1] + 1
        image, prev = torch.rand(1, 3, 64, 64), torch.zeros(1, 1, 64, 64)
        clicks = torch.tensor([[[20.0, 30.0, 1.0]]])
        box = torch.tensor([[8.0, 8.0, 40.0, 50.0]])
        with torch.inference_mode():
            assert torch.equal(grown(image, clicks, prev).logits, net(image, clicks, prev).logits)
            as_prev = net(image, clicks, box_maps(box, 1, 64, 64)).logits
            assert torch.allclose(grown(image, clicks, prev, boxes=box).logits, as_prev, atol=1e-5)
        grown.train()
        grown(image.expand(2, -1, -1, -1), clicks.expand(2, -1, -1), prev.expand(2, -1, -1, -1),
              boxes=box.expand(2, -1)).logits.sum().backward()
        assert grown.backbone.first_conv().weight.grad[:, -1].abs().sum() > 0   # the new channel learns

    # late_fusion turned on: the decoder's new guidance inputs start silent
    net = InteractiveSegNet(ModelConfig(**small)).eval()
    widened = grow(net, ModelConfig(**small, late_fusion=True)).eval()
    with torch.inference_mode():
        assert torch.equal(widened(image, clicks, prev).logits, net(image, clicks, prev).logits)
    with pytest.raises(ValueError, match="cannot grow"):
        grow(net, ModelConfig(aspp_channels=32, decoder_channels=48))
    with pytest.raises(ValueError, match="cannot grow"):
        grow(net, ModelConfig(**small, boundary_head=True))
    with pytest.raises(ValueError, match="cannot grow"):
        grow(widened, ModelConfig(**small))       # dropping an input loses what it learned
