"""The 32-channel autoencoder (§2), latent 2x2 patchify + BatchNorm normalisation (§3), decoder projector (§4)."""

import torch
import torch.nn as nn
import torch.nn.functional as F

BN_EPS = 1e-4


def group_norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, c, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1 = group_norm(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = group_norm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        skip = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return skip + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the h*w positions, head width C (§2.1, §19.2: SDPA)."""

    def __init__(self, c: int):
        super().__init__()
        self.norm = group_norm(c)
        self.q = nn.Conv2d(c, c, 1)
        self.k = nn.Conv2d(c, c, 1)
        self.v = nn.Conv2d(c, c, 1)
        self.proj_out = nn.Conv2d(c, c, 1)

    def forward(self, x):
        b, c, h, w = x.shape
        y = self.norm(x)
        # (B,C,h,w) -> (B,1,h*w,C): one head, raster-order tokens
        q, k, v = (m(y).reshape(b, 1, c, h * w).transpose(2, 3) for m in (self.q, self.k, self.v))
        a = F.scaled_dot_product_attention(q, k, v)          # (B,1,h*w,C)
        a = a.transpose(2, 3).reshape(b, c, h, w)
        return x + self.proj_out(a)


class Downsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2, padding=0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))             # right/bottom only (§17.22)


class Upsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    pass


class _Mid(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.block_1 = ResnetBlock(c, c)
        self.attn_1 = AttnBlock(c)
        self.block_2 = ResnetBlock(c, c)

    def forward(self, x):
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    """pixels (B,3,H,W) in [0,1] -> moments (B,2z,H/f,W/f) after quant_conv."""

    def __init__(self, cfg):
        super().__init__()
        ch, mult, nres, z = cfg.ch, list(cfg.ch_mult), cfg.num_res_blocks, cfg.z_channels
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, 3, padding=1)
        in_mult = [1] + mult
        self.down = nn.ModuleList()
        for i in range(len(mult)):
            level = _Level()
            cin, cout = ch * in_mult[i], ch * mult[i]
            level.block = nn.ModuleList([ResnetBlock(cin if j == 0 else cout, cout) for j in range(nres)])
            if i != len(mult) - 1:
                level.downsample = Downsample(cout)
            self.down.append(level)
        c = ch * mult[-1]
        self.mid = _Mid(c)
        self.norm_out = group_norm(c)
        self.conv_out = nn.Conv2d(c, 2 * z, 3, padding=1)
        self.quant_conv = nn.Conv2d(2 * z, 2 * z, 1)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = block(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid(h)
        return self.quant_conv(self.conv_out(F.silu(self.norm_out(h))))


class Decoder(nn.Module):
    """latent (B,z,h,w) -> pixels (B,3,f*h,f*w); no output activation, no clamp."""

    def __init__(self, cfg):
        super().__init__()
        ch, mult, nres, z = cfg.ch, list(cfg.ch_mult), cfg.num_res_blocks, cfg.z_channels
        self.post_quant_conv = nn.Conv2d(z, z, 1)
        c = ch * mult[-1]
        self.conv_in = nn.Conv2d(z, c, 3, padding=1)
        self.mid = _Mid(c)
        up = [None] * len(mult)
        for i in reversed(range(len(mult))):  # built (and run) from the deepest level; stored by level index
            level = _Level()
            cout = ch * mult[i]
            level.block = nn.ModuleList([ResnetBlock(c if j == 0 else cout, cout) for j in range(nres + 1)])
            if i != 0:
                level.upsample = Upsample(cout)
            up[i] = level
            c = cout
        self.up = nn.ModuleList(up)
        self.norm_out = group_norm(c)
        self.conv_out = nn.Conv2d(c, cfg.out_ch, 3, padding=1)

    def forward(self, z):
        h = self.conv_in(self.post_quant_conv(z))
        h = self.mid(h)
        for i in reversed(range(len(self.up))):
            level = self.up[i]
            for block in level.block:
                h = block(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


def patchify(m):
    """(B,C,2h,2w) -> (B,4C,h,w), channel = 4c + 2pi + pj (§3.1, §17.14)."""
    b, c, hh, ww = m.shape
    m = m.reshape(b, c, hh // 2, 2, ww // 2, 2)          # (B,C,h,pi,w,pj)
    return m.permute(0, 1, 3, 5, 2, 4).reshape(b, 4 * c, hh // 2, ww // 2)


def unpatchify(z):
    """(B,4C,h,w) -> (B,C,2h,2w), inverse of patchify."""
    b, c4, h, w = z.shape
    z = z.reshape(b, c4 // 4, 2, 2, h, w)                 # (B,C,pi,pj,h,w)
    return z.permute(0, 1, 4, 2, 5, 3).reshape(b, c4 // 4, 2 * h, 2 * w)


def _latent_bn(channels: int) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(channels, eps=BN_EPS, momentum=0.1, affine=False)
    bn.eval()
    return bn


def denormalize(z_n, bn):
    """z = z_n * sqrt(var + eps) + mean, in the latent's dtype (§3.2 step 1)."""
    dt = z_n.dtype
    std = torch.sqrt(bn.running_var.to(dt) + BN_EPS)[None, :, None, None]
    return z_n * std + bn.running_mean.to(dt)[None, :, None, None]


def normalize(z, bn):
    """eval-mode BatchNorm without affine (§3.1 step 4)."""
    return F.batch_norm(z, bn.running_mean.to(z.dtype), bn.running_var.to(z.dtype), training=False, eps=BN_EPS)


class VAE(nn.Module):
    """`model.vae_model`: encoder, final-image decoder, latent BatchNorm."""

    def __init__(self, enc_cfg, dec_cfg):
        super().__init__()
        self.encoder = Encoder(enc_cfg)
        self.decoder = Decoder(dec_cfg)
        self.bn = _latent_bn(4 * enc_cfg.z_channels)
        self.z_channels = enc_cfg.z_channels

    def encode(self, pixels):
        """pixels (B,3,H,W) in [0,1] -> normalised patchified latent (B,4z,H/2f,W/2f); mean only, no sampling."""
        moments = self.encoder(pixels)
        return normalize(patchify(moments[:, : self.z_channels]), self.bn)

    def decode(self, z_n):
        """normalised latent -> pixels (unclamped)."""
        return self.decoder(unpatchify(denormalize(z_n, self.bn)))


class DecoderProjector(nn.Module):
    """`model.vae_decoder_projector`: its own decoder and BN stats; latent -> image fed to the ViT (§4)."""

    def __init__(self, dec_cfg):
        super().__init__()
        self.decoder = Decoder(dec_cfg)
        self.bn = _latent_bn(4 * dec_cfg.z_channels)

    def forward(self, z_n):
        return self.decoder(unpatchify(denormalize(z_n, self.bn)))
