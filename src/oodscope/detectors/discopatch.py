"""DisCoPatch: covariate-shift OOD from the batch statistics of an adversarial patch
discriminator (Caetano et al., "DisCoPatch: Taming Adversarially-driven Batch Statistics for
Improved Out-of-Distribution Detection", 2025; code caetas/DisCoPatch).

Training (unsupervised, ID images only): random square patches are cut from the images; a
VAE reconstructs them and generates patches from N(0, I); a discriminator ``D`` (convs with
batch normalisation, LeakyReLU, a linear layer and a sigmoid) learns real patches vs the
VAE's reconstructions and samples, while the VAE learns to reconstruct and to fool ``D``:

    L_VAE = MSE(x, x̂) + w_kld·KLD + w_rec·BCE(D(x̂), 1) + w_gen·BCE(D(x_gen), 1)
    L_D   = [BCE(D(x), 1) + ½ BCE(D(x_gen), 0) + ½ BCE(D(x̂), 0)] / 2

Each call of ``D`` normalises with the statistics of the batch it is given, and every batch
is all real or all generated, so ``D`` learns what the *statistics* of real ID patches look
like. At test time the batch is the ``test_patches`` patches of **one** image ("PatchNorm":
per-channel mean and variance over that image's patches), so an image is judged by its
own statistics and its score never depends on the other images scored with it:

    S(x) = mean_p D(patch_p(x))      (higher = more in-distribution)

The VAE is discarded after training. Inputs are ``extras["inputs"]`` (N, C, H, W), (N, H, W)
or (N, H·W) for square single-channel images; they are mapped to [-1, 1] with the training
minimum and maximum (the VAE decodes through tanh).

Training patches sit at random corners drawn per image and step (as the authors' loader);
test patches sit at ``test_patches`` random corners drawn once at fit time and shared by
every image, so a score is a deterministic function of the image (the authors redraw them
per image at test time).

Deviations, for 28x28 images on a CPU in minutes: patches of 16 px (paper: 64 px of 256 px
images), two conv stages [32, 64] and a 32-d latent (paper: [128, 256, 512, 1024], latent
1024), 8 training / 16 test patches per image (paper: 48 / 64), Adam lr 5e-4 (paper 8.5e-5),
a fixed number of steps instead of 80 epochs, MSE reconstruction (the paper also offers
MS-SSIM). The committed code's discriminator uses GroupNorm and its eval swaps BatchNorm for
PatchNorm; here ``D`` has batch normalisation as the paper describes, so PatchNorm really
replaces it at test time. LeakyReLU slope 0.01 as in the authors' code.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .._params import store_params
from ..features import Features
from .base import Detector, register

__all__ = ["DisCoPatch", "patch_positions", "as_images"]

#: LeakyReLU slope of the authors' code (torch's default).
_SLOPE = 0.01


def as_images(inputs: np.ndarray) -> np.ndarray:
    """(N, C, H, W) float32 from (N, C, H, W), (N, H, W) or (N, S*S) inputs."""
    x = np.asarray(inputs)
    if x.ndim == 2:
        side = int(round(np.sqrt(x.shape[1])))
        if side * side != x.shape[1]:
            raise ValueError(f"DisCoPatch: flat inputs of width {x.shape[1]} are not square images; "
                             "pass extras['inputs'] as (N, C, H, W) or (N, H, W).")
        x = x.reshape(len(x), 1, side, side)
    elif x.ndim == 3:
        x = x[:, None]
    elif x.ndim != 4:
        raise ValueError(f"DisCoPatch needs image inputs (N, C, H, W), (N, H, W) or (N, S*S); got shape {x.shape}.")
    return x.astype(np.float32, copy=False)


def patch_positions(height: int, width: int, size: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` random top-left corners ``(row, col)`` of ``size``-px patches inside an image."""
    if size > height or size > width:
        raise ValueError(f"patch_size={size} exceeds the image size {height}x{width}; use a smaller patch_size.")
    rows = rng.integers(0, height - size + 1, count)
    cols = rng.integers(0, width - size + 1, count)
    return np.stack([rows, cols], axis=1).astype(np.int64)


def _cut(x, pos, size):
    """Patches ``(N·P, C, size, size)`` of images ``x`` (N, C, H, W), ordered image by image.

    ``pos`` is (P, 2) — the same top-left corners in every image — or (N, P, 2), each
    image its own corners."""
    import torch

    pos = torch.as_tensor(np.asarray(pos))
    if pos.ndim == 2:
        pos = pos.expand(x.shape[0], *pos.shape)
    ar = torch.arange(size)
    rows = pos[..., 0, None] + ar  # (N, P, s)
    cols = pos[..., 1, None] + ar
    n = torch.arange(x.shape[0])[:, None, None, None]
    patches = x[n, :, rows[..., :, None], cols[..., None, :]]  # (N, P, s, s, C)
    return patches.permute(0, 1, 4, 2, 3).reshape(-1, x.shape[1], size, size)


def _build_nets(channels: int, size: int, hidden: tuple[int, ...], latent: int):
    import torch
    from torch import nn

    class PatchBatchNorm(nn.Module):
        """BatchNorm without running statistics; with ``group`` set, the statistics are taken
        over each run of ``group`` consecutive samples (one image's patches): PatchNorm."""

        def __init__(self, c):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(c))
            self.bias = nn.Parameter(torch.zeros(c))

        def forward(self, x, group=None):
            n, c, h, w = x.shape
            g = x.view(1 if group is None else n // group, -1 if group is None else group, c, h, w)
            mean = g.mean(dim=(1, 3, 4), keepdim=True)
            var = g.var(dim=(1, 3, 4), keepdim=True, unbiased=False)
            g = (g - mean) / torch.sqrt(var + 1e-5)
            return g.reshape(n, c, h, w) * self.weight[None, :, None, None] + self.bias[None, :, None, None]

    class Discriminator(nn.Module):
        def __init__(self):
            super().__init__()
            convs, norms, c, s = [], [], channels, size
            for h in hidden:
                convs.append(nn.Conv2d(c, h, 3, stride=2, padding=1))
                norms.append(PatchBatchNorm(h))
                c, s = h, (s + 1) // 2
            self.convs, self.norms = nn.ModuleList(convs), nn.ModuleList(norms)
            self.out = nn.Linear(c * s * s, 1)

        def forward(self, x, group=None):
            for conv, norm in zip(self.convs, self.norms):
                x = nn.functional.leaky_relu(norm(conv(x), group), _SLOPE)
            return torch.sigmoid(self.out(x.flatten(1))).squeeze(1)

    class VAE(nn.Module):
        def __init__(self):
            super().__init__()
            enc, c, s = [], channels, size
            for h in hidden:
                enc += [nn.Conv2d(c, h, 3, stride=2, padding=1), nn.BatchNorm2d(h), nn.LeakyReLU(_SLOPE)]
                c, s = h, (s + 1) // 2
            self.enc, self.side, self.top = nn.Sequential(*enc), s, c
            self.mu, self.logvar = nn.Linear(c * s * s, latent), nn.Linear(c * s * s, latent)
            self.dec_in = nn.Linear(latent, c * s * s)
            dec, rev = [], list(hidden[::-1]) + [hidden[0]]
            for a, b in zip(rev[:-1], rev[1:]):
                dec += [nn.ConvTranspose2d(a, b, 3, stride=2, padding=1, output_padding=1), nn.BatchNorm2d(b),
                        nn.LeakyReLU(_SLOPE)]
            self.dec = nn.Sequential(*dec, nn.Conv2d(hidden[0], channels, 3, padding=1), nn.Tanh())
            self.size = size

        def decode(self, z):
            x = self.dec(self.dec_in(z).view(-1, self.top, self.side, self.side))
            return x[..., : self.size, : self.size]

        def forward(self, x):
            h = self.enc(x).flatten(1)
            mu, logvar = self.mu(h), self.logvar(h).clamp(-10, 10)
            z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
            return self.decode(z), mu, logvar

    return Discriminator(), VAE()


@register("discopatch")
class DisCoPatch(Detector):
    """DisCoPatch (unsupervised, covariate shift): mean discriminator output over an image's
    own patches, normalised with that image's patch statistics. See the module docstring."""

    requires = frozenset({"inputs"})
    not_by_default = "trains a VAE and a patch discriminator (minutes); name it to run it"
    fit_fields = frozenset({"inputs"})
    reference = ("Caetano et al., DisCoPatch: Taming Adversarially-driven Batch Statistics for "
                 "Improved Out-of-Distribution Detection, arXiv 2501.08005 (2025); code caetas/DisCoPatch")
    search_space = {"test_patches": [8, 16, 32]}
    score_params = frozenset({"test_patches"})
    sign_test_exempt = ("unsupervised covariate-shift detector trained in a few steps on the synthetic "
                        "vectors-as-8x8-images; tests/test_detectors_discopatch.py checks its sign")
    transient_state = frozenset()

    def __init__(self, patch_size: int = 16, hidden_dims: tuple = (32, 64), latent_dim: int = 32,
                 train_patches: int = 8, test_patches: int = 16, steps: int = 2000, batch_images: int = 32,
                 lr: float = 5e-4, kld_weight: float = 1e-4, gen_weight: float = 1e-3,
                 recon_weight: float = 1e-3, seed: int = 0, batch_size: int = 256):
        store_params(self, locals())

    def _check_params(self) -> None:
        for name in ("patch_size", "latent_dim", "train_patches", "test_patches", "steps", "batch_images",
                     "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}.")
        if self.train_patches < 2 or self.test_patches < 2:
            raise ValueError("train_patches and test_patches must be >= 2: the normalisation statistics "
                             "come from an image's patches.")
        hd = tuple(self.hidden_dims) if isinstance(self.hidden_dims, (list, tuple)) else ()
        if not hd or any(isinstance(h, bool) or not isinstance(h, (int, np.integer)) or h < 1 for h in hd):
            raise ValueError(f"hidden_dims must be a non-empty sequence of positive ints, got {self.hidden_dims!r}.")
        for name in ("lr", "kld_weight", "gen_weight", "recon_weight"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not v >= 0:
                raise ValueError(f"{name} must be a number >= 0, got {v!r}.")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}.")

    # ------------------------------------------------------------------ fit
    def _fit(self, train: Features) -> None:
        import torch

        images = as_images(train.extras["inputs"])
        n, c, h, w = images.shape
        rng = np.random.default_rng(self.seed)
        patch_positions(h, w, self.patch_size, 1, rng)  # validates the size before training
        lo, hi = float(images.min()), float(images.max())
        if not hi > lo:
            raise ValueError("DisCoPatch.fit: every training input has the same value; there is nothing "
                             "to learn about ID images.")
        self.input_range_ = np.array([lo, hi])
        self.image_shape_ = [int(c), int(h), int(w)]
        torch.manual_seed(int(self.seed))
        disc, vae = _build_nets(c, self.patch_size, tuple(int(v) for v in self.hidden_dims), int(self.latent_dim))
        x_all = torch.from_numpy(self._scaled(images))
        opt_v = torch.optim.Adam(vae.parameters(), lr=self.lr)
        opt_d = torch.optim.Adam(disc.parameters(), lr=self.lr)
        bce = torch.nn.functional.binary_cross_entropy
        log = {"d_loss": [], "g_loss": []}
        for _ in range(int(self.steps)):
            idx = rng.integers(0, n, min(int(self.batch_images), n))
            pos = patch_positions(h, w, self.patch_size, len(idx) * int(self.train_patches), rng)
            real = _cut(x_all[idx], pos.reshape(len(idx), -1, 2), self.patch_size)
            ones, zeros = torch.ones(len(real)), torch.zeros(len(real))
            recon, mu, logvar = vae(real)
            gen = vae.decode(torch.randn(len(real), int(self.latent_dim)))
            kld = torch.mean(-0.5 * torch.sum(1 + logvar - mu ** 2 - logvar.exp(), dim=1))
            g_loss = (torch.nn.functional.mse_loss(recon, real) + self.kld_weight * kld
                      + self.recon_weight * bce(disc(recon), ones) + self.gen_weight * bce(disc(gen), ones))
            opt_v.zero_grad()
            g_loss.backward()
            opt_v.step()
            d_loss = (bce(disc(real), ones) + 0.5 * bce(disc(gen.detach()), zeros)
                      + 0.5 * bce(disc(recon.detach()), zeros)) / 2
            opt_d.zero_grad()
            d_loss.backward()
            opt_d.step()
            log["d_loss"].append(float(d_loss.detach()))
            log["g_loss"].append(float(g_loss.detach()))
        if not np.isfinite(log["d_loss"][-1]) or not np.isfinite(log["g_loss"][-1]):
            raise FloatingPointError("DisCoPatch training diverged (non-finite loss); lower lr.")
        self.discriminator_ = {k: v.detach().cpu().numpy().copy() for k, v in disc.state_dict().items()}
        self.test_positions_ = patch_positions(h, w, self.patch_size, int(self.test_patches),
                                               np.random.default_rng(self.seed + 1))
        self.final_losses_ = {"d_loss": float(np.mean(log["d_loss"][-50:])),
                              "g_loss": float(np.mean(log["g_loss"][-50:]))}
        self._net = disc.eval()

    def _scaled(self, images: np.ndarray) -> np.ndarray:
        lo, hi = self.input_range_
        return (2.0 * (images - lo) / (hi - lo) - 1.0).astype(np.float32)

    # ------------------------------------------------------------------ score
    def _discriminator(self):
        net = getattr(self, "_net", None)
        if net is None:
            import torch

            c = self.image_shape_[0]
            net, _ = _build_nets(c, self.patch_size, tuple(int(v) for v in self.hidden_dims), int(self.latent_dim))
            net.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in self.discriminator_.items()})
            self._net = net.eval()
        return net

    def _positions(self) -> np.ndarray:
        if len(self.test_positions_) == self.test_patches:
            return self.test_positions_
        _, h, w = self.image_shape_  # test_patches changed after fit (a score parameter)
        return patch_positions(h, w, self.patch_size, int(self.test_patches), np.random.default_rng(self.seed + 1))

    def _score(self, x: Features) -> np.ndarray:
        import torch

        images = as_images(x.extras["inputs"])
        if list(images.shape[1:]) != self.image_shape_:
            raise ValueError(f"DisCoPatch was fitted on images of shape {tuple(self.image_shape_)} but got "
                             f"{tuple(images.shape[1:])}; score images of the same size and channels.")
        net, pos = self._discriminator(), self._positions()
        out = np.empty(len(images))
        with torch.no_grad():
            for start in range(0, len(images), int(self.batch_size)):
                xb = torch.from_numpy(self._scaled(images[start:start + int(self.batch_size)]))
                d = net(_cut(xb, pos, self.patch_size), group=len(pos))
                out[start:start + len(xb)] = d.view(len(xb), len(pos)).mean(1).double().numpy()
        return out

    def set_state(self, state: dict[str, Any]) -> "DisCoPatch":
        super().set_state(state)
        self._net = None  # rebuilt from discriminator_ on the next score
        return self

    def _reset_fit(self) -> None:
        super()._reset_fit()
        self._net = None
