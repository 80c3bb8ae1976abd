"""Red-circle visual prompts (SALF-CBM §3.2): ring masks, on-device blending, CLIP encoding of all variants.

Coordinates: pixel (i, j) has its centre at (y, x) = (i, j); a ring is the annulus
|rho - radius| <= width / 2 around a centre, rasterised with antialiasing (pixel coverage).
"""


from collections.abc import Sequence

import torch
import torch.nn.functional as F

from lib.core.device import autocast_dtype
from lib.kernels.preprocess import Preprocess

__all__ = ["CircleEncoder", "RingGeometryError", "blend_rings", "grid_centers", "ring_alpha", "validate_grid"]


class RingGeometryError(ValueError):
    """A ring layout that does not fit the image; `parameter` names the value at fault ("grid", "radius" or "width")."""

    def __init__(self, message: str, parameter: str) -> None:
        super().__init__(message)
        self.parameter = parameter


def grid_centers(size: int, grid: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Return the (grid*grid, 2) float32 (y, x) centres of the prompt grid, row-major over (h, w).

    Stride d = floor(size / (grid + 1)) and centres d * (i + 1), as in SALF-CBM Algorithm 1.
    """
    if grid < 1:
        raise RingGeometryError(f"grid must be >= 1, got {grid}", "grid")
    stride = size // (grid + 1)
    if stride < 1:
        raise RingGeometryError(f"grid={grid} is larger than the image (size={size}); need grid <= size - 1", "grid")
    ticks = stride * torch.arange(1, grid + 1, dtype=torch.float32, device=device)
    ys, xs = torch.meshgrid(ticks, ticks, indexing="ij")
    return torch.stack([ys.reshape(-1), xs.reshape(-1)], dim=1)


def _edge_coverage(signed_dist: torch.Tensor, cos_t: torch.Tensor, sin_t: torch.Tensor) -> torch.Tensor:
    """Fraction of a unit pixel inside a straight edge at `signed_dist` from the pixel centre.

    The box-filtered half-plane: the CDF of a*U1 + b*U2 (U ~ uniform(-1/2, 1/2)) where (a, b) are
    the |cos|, |sin| of the edge normal. It is a quadratic ramp joined by a linear part, exact for
    straight edges at any angle, so only the ring's curvature (O(1/radius)) is approximated.
    """
    a = torch.maximum(cos_t.abs(), sin_t.abs())
    # b -> 0 (axis-aligned edge) makes the quadratic piece vanish; the floor avoids 0/0.
    b = torch.minimum(cos_t.abs(), sin_t.abs()).clamp_min(1e-6)
    s = signed_dist.abs()
    half_sum, half_diff = (a + b) / 2, (a - b) / 2
    linear = 0.5 + s / a
    quadratic = 1 - (half_sum - s).clamp_min(0) ** 2 / (2 * a * b)
    upper = torch.where(s <= half_diff, linear, quadratic)
    return torch.where(signed_dist >= 0, upper, 1 - upper)


def ring_alpha(size: int, centers: torch.Tensor, radius: float, width: float) -> torch.Tensor:
    """Antialiased ring masks, (K, size, size) float32 in [0, 1], on `centers.device`.

    alpha = pixel coverage of the annulus |rho - radius| <= width / 2 around each (y, x) centre
    of `centers` (K, 2), computed analytically (difference of two box-filtered edges).
    """
    if centers.ndim != 2 or centers.shape[1] != 2:
        raise ValueError(f"centers must have shape (K, 2) (y, x), got {tuple(centers.shape)}")
    if radius <= 0 or width <= 0:
        raise ValueError(f"radius and width must be > 0, got radius={radius}, width={width}")
    coords = torch.arange(size, dtype=torch.float32, device=centers.device)
    centers = centers.to(torch.float32)
    dy = coords.view(1, size, 1) - centers[:, 0].view(-1, 1, 1)
    dx = coords.view(1, 1, size) - centers[:, 1].view(-1, 1, 1)
    rho = torch.hypot(dy, dx)
    # Radial unit normal; at rho == 0 any unit direction will do (the pixel is far from the ring).
    at_center = rho == 0
    cos_t = torch.where(at_center, 1.0, dx / rho)
    sin_t = torch.where(at_center, 0.0, dy / rho)
    outer = _edge_coverage(radius + width / 2 - rho, cos_t, sin_t)
    inner = _edge_coverage(radius - width / 2 - rho, cos_t, sin_t)
    return (outer - inner).clamp_(0.0, 1.0)


def blend_rings(
    x_norm: torch.Tensor,
    alpha: torch.Tensor,
    color_norm: torch.Tensor,
    *,
    per_image: bool | None = None,
) -> torch.Tensor:
    """Draw rings on normalised images: x * (1 - alpha) + color_norm * alpha.

    x_norm (B, 3, S, S); color_norm (3,) is the ring colour after the same normalisation (the
    normalisation is affine per channel, so this equals drawing on the raw image first).
    alpha (V, S, S) with per_image=False: every ring on every image -> (B*V, 3, S, S), image-major.
    alpha (B, S, S) with per_image=True: ring b on image b -> (B, 3, S, S).
    per_image=None infers the mode from the shape and refuses the ambiguous V == B.
    """
    if x_norm.ndim != 4 or x_norm.shape[1] != 3:
        raise ValueError(f"x_norm must have shape (B, 3, S, S), got {tuple(x_norm.shape)}")
    batch, _, height, width = x_norm.shape
    if alpha.ndim != 3 or tuple(alpha.shape[1:]) != (height, width):
        raise ValueError(
            f"alpha must have shape (V, {height}, {width}) matching x_norm, got {tuple(alpha.shape)}"
        )
    if color_norm.shape != (3,):
        raise ValueError(f"color_norm must have shape (3,), got {tuple(color_norm.shape)}")
    if per_image is None:
        if alpha.shape[0] == batch:
            raise ValueError(
                f"alpha has {batch} rings for {batch} images: ambiguous, pass per_image=True "
                "(ring b on image b) or per_image=False (every ring on every image)"
            )
        per_image = False
    if per_image and alpha.shape[0] != batch:
        raise ValueError(f"per_image=True needs one ring per image: alpha has {alpha.shape[0]}, B={batch}")
    color = color_norm.to(device=x_norm.device, dtype=x_norm.dtype).view(3, 1, 1)
    alpha = alpha.to(device=x_norm.device, dtype=x_norm.dtype)
    if per_image:
        return torch.lerp(x_norm, color, alpha.unsqueeze(1))
    # Broadcast (B, 1, 3, S, S) against (1, V, 1, S, S): all B*V variants in one kernel.
    out = torch.lerp(x_norm.unsqueeze(1), color, alpha.unsqueeze(1).unsqueeze(0))
    return out.reshape(batch * alpha.shape[0], 3, height, width)


def validate_grid(size: int, grid: int, radius: float, width: float) -> None:
    """Raise RingGeometryError unless a grid x grid layout of rings fits a size x size image (>= 2 px).

    Checks: size >= 2, 1 <= grid < size (stride >= 1), radius > 0, 0 < width < 2 * radius (a
    ring, not a disc), and every ring reaches into the image (its inner edge is nearer than the
    centre's farthest image corner).
    """
    if size < 2:
        raise ValueError(f"size must be >= 2 pixels, got {size}")
    if radius <= 0:
        raise RingGeometryError(f"radius must be > 0 pixels, got {radius}", "radius")
    if width <= 0:
        raise RingGeometryError(f"width must be > 0 pixels, got {width}", "width")
    if width >= 2 * radius:
        raise RingGeometryError(f"width={width} must be < 2 * radius = {2 * radius} so the ring has a hole", "width")
    centers = grid_centers(size, grid)  # raises for grid < 1 or larger than the image
    # Distance from each centre to its farthest image corner; the worst centre bounds the radius.
    reach = torch.maximum(centers, (size - 1) - centers).norm(dim=1).min().item()
    if radius - width / 2 >= reach:
        raise RingGeometryError(
            f"radius={radius} is too large for size={size}, grid={grid}: some rings would lie wholly "
            f"outside the image; need radius - width/2 < {reach:.1f}",
            "radius",
        )


class CircleEncoder:
    """CLIP embeddings of every red-circle variant of a batch of images.

    The ring masks are made once on the model's device; each call normalises the batch once,
    blends all grid*grid variants into the normalised tensor and encodes them in forwards of at
    most `chunk` images (whole source images of grid*grid variants each, at least one).
    `autocast` follows `lib.core.device.autocast_dtype` ("auto": low precision only where the
    hardware runs it natively).
    """

    def __init__(
        self,
        clip_model: torch.nn.Module,
        preprocess: Preprocess,
        grid: int = 7,
        radius: float = 32.0,
        width: float = 2.0,
        color: Sequence[int] = (255, 0, 0),
        chunk: int = 512,
        autocast: bool | str = "auto",
    ) -> None:
        validate_grid(preprocess.size, grid, radius, width)
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1 images per forward, got {chunk}")
        self.clip_model = clip_model
        self.preprocess = preprocess
        self.grid = grid
        self.device = next(clip_model.parameters()).device
        self.alpha = ring_alpha(preprocess.size, grid_centers(preprocess.size, grid, self.device), radius, width)
        self.color_norm = preprocess.normalise_color(tuple(color), self.device)
        self.images_per_forward = max(1, chunk // self.alpha.shape[0])
        self.dtype = autocast_dtype(self.device, autocast)

    @torch.inference_mode()
    def __call__(self, images_uint8: torch.Tensor) -> torch.Tensor:
        """L2-normalised float32 (B, G, G, D) embeddings of uint8 (B, H, W, 3) images, a ring at cell (h, w)."""
        x = self.preprocess(images_uint8.to(self.device, non_blocking=True))
        embeddings = []
        for start in range(0, x.shape[0], self.images_per_forward):
            blended = blend_rings(x[start : start + self.images_per_forward], self.alpha, self.color_norm, per_image=False)
            with torch.autocast(self.device.type, self.dtype or torch.bfloat16, enabled=self.dtype is not None):
                embeddings.append(self.clip_model.encode_image(blended).float())
        emb = F.normalize(torch.cat(embeddings), dim=-1)
        return emb.view(x.shape[0], self.grid, self.grid, -1)
