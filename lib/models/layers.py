"""Layers addressed by dotted module names: lookup, multi-layer feature extraction, head/tail split.

Names are `model.named_modules()` paths (e.g. "layer3", "layer3.1.conv2",
"encoder.layers.encoder_layer_11"), the same strings params.yaml uses.
"""

import difflib
import inspect
import math
from collections.abc import Callable, Sequence

import torch
import torch.fx as fx
from bcos.modules import LogitLayer
from bcos.modules.common import DetachableModule
from torch import nn

from lib.core.errors import user_error_for


def layer_names(model: nn.Module) -> list[str]:
    """Every addressable layer name of `model`, in registration order (root excluded)."""
    return [name for name, _ in model.named_modules() if name]


class LayerNotFoundError(ValueError):
    """A layer name the model does not have."""


def resolve_layer(model: nn.Module, name: str) -> nn.Module:
    """The submodule at dotted path `name`; LayerNotFoundError naming the closest valid names if unknown.

    The message stays one short line for any model size: the closest names and the model's
    top-level children (every dotted path below them is valid too), not all of its modules.
    """
    modules = dict(model.named_modules())
    if name and name in modules:
        return modules[name]
    valid = layer_names(model)
    close = difflib.get_close_matches(str(name), valid, n=5, cutoff=0.5)
    top = [child for child, _ in model.named_children()]
    shown = ", ".join(top[:12]) + (", ..." if len(top) > 12 else "")
    hint = f"closest: {', '.join(close)}; " if close else ""
    raise LayerNotFoundError(
        f"layer {name!r} not found in {type(model).__name__}; {hint}top-level layers: {shown} "
        f"(and the dotted paths below them, {len(valid)} names in all)"
    )


def check_layers(model: nn.Module, names: Sequence[str], key: str) -> None:
    """Raise a UserError naming the params `key` for the first of `names` that `model` does not have.

    `model` may live on the meta device (`backbone_skeleton`): only its module names are read.
    """
    for name in names:
        fix = "use a module of the backbone, by its dotted path in model.named_modules()"
        with user_error_for(key, name, catch=(LayerNotFoundError,), fix=fix):
            resolve_layer(model, name)


class _AllCaptured(Exception):
    """Raised from a hook to stop the forward pass once every requested layer has run."""


def _num_prefix_tokens(model: nn.Module, num_tokens: int) -> int:
    """Class/register tokens in front of a ViT's square patch grid.

    timm models declare it; otherwise (torchvision, open_clip) the patch grid is the largest
    square that fits and the remainder are prefix tokens.
    """
    declared = getattr(model, "num_prefix_tokens", None)
    if isinstance(declared, int):
        return declared
    return num_tokens - math.isqrt(num_tokens) ** 2


def _token_grid(model: nn.Module, name: str, output: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """ViT tokens (B, N, C) (or sequence-first (N, B, C)) as (patch grid (B, C, h, w), prefix
    tokens (B, P, C), sequence-first?). The grid is row-major over the image's patches: token
    P + i * w + j is patch (i, j), as every ViT flattens its patch embedding; the P class and
    register tokens in front are not patches and stay out of the grid."""
    if output.ndim != 3:
        raise ValueError(f"layer {name!r} returns shape {tuple(output.shape)}; expected ViT tokens (B, N, C)")
    seq_first = output.shape[0] != batch
    tokens = output.transpose(0, 1) if seq_first else output  # sequence-first transformers
    prefix = _num_prefix_tokens(model, tokens.shape[1])
    side = math.isqrt(tokens.shape[1] - prefix)
    if side * side != tokens.shape[1] - prefix:
        raise ValueError(f"layer {name!r}: {tokens.shape[1]} tokens minus {prefix} prefix tokens is not a square patch grid")
    grid = tokens[:, prefix:].transpose(1, 2).reshape(batch, tokens.shape[2], side, side)
    return grid, tokens[:, :prefix], seq_first


def tokens_from_grid(grid: torch.Tensor, prefix: torch.Tensor, seq_first: bool = False) -> torch.Tensor:
    """The inverse of the token-to-grid step: prefix tokens (B, P, C) and a patch grid (B, C, h, w)
    back to tokens (B, P + h*w, C) (or (P + h*w, B, C) with seq_first)."""
    tokens = torch.cat([prefix, grid.flatten(2).transpose(1, 2)], dim=1)
    return tokens.transpose(0, 1) if seq_first else tokens


def _as_feature_map(
    model: nn.Module, name: str, output: object, batch: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A layer output as a (B, C, h, w) map, plus the class token (B, C) for ViT token outputs."""
    if not isinstance(output, torch.Tensor):
        raise ValueError(f"layer {name!r} returns {type(output).__name__}, not a tensor; pick a layer that returns a tensor")
    if output.ndim == 4:
        return output, None
    if output.ndim == 2:  # pooled features or logits: a 1 x 1 map
        return output[:, :, None, None], None
    if output.ndim != 3:
        raise ValueError(f"layer {name!r} returns shape {tuple(output.shape)}; expected (B, C), (B, C, h, w) or ViT tokens (B, N, C)")
    grid, prefix, _ = _token_grid(model, name, output, batch)
    return grid, (prefix[:, 0] if prefix.shape[1] else None)


def extract_layers(model: nn.Module, x: torch.Tensor, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """Outputs of several layers from one forward pass of `model` on `x`.

    Returns {name: (B, C, h, w)}; vectors (B, C) become 1 x 1 maps, and ViT token outputs
    (B, N, C) are reshaped to their patch grid
    and their class token is added as "<name>.cls" (B, C). Outputs are copies taken as each
    layer runs (later in-place ops such as ReLU(inplace) cannot alter them), and the forward
    stops as soon as the last requested layer has run. Gradients flow through the outputs.
    """
    _, captured = _capture(model, x, names, stop=True)
    return _feature_maps(model, captured, x.shape[0])


def forward_with_layers(model: nn.Module, x: torch.Tensor, names: Sequence[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(model(x), extract_layers(model, x, names)) from a single forward pass: the cost of the bare model."""
    result, captured = _capture(model, x, names, stop=False)
    return result, _feature_maps(model, captured, x.shape[0])


def forward_keeping_maps(
    model: nn.Module, x: torch.Tensor, names: Sequence[str]
) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor | None]]:
    """(model(x), {name: activation map (B, C, h, w)}, {name: prefix tokens (B, P, C), None for
    maps}) from one forward pass.

    A (B, C, h, w) output is kept and the rest of the network runs on a clone: later in-place ops
    cannot alter it, and the derivative of anything computed from a kept map reaches it both
    through that use and through the later layers — the total derivative Grad-CAM's hooks take.
    (extract_layers' copies are leaves of the graph for the later layers instead.)

    A ViT layer's tokens (B, N, C) become their patch grid G (row-major; the class and register
    tokens are dropped from the map and returned apart), and the network goes on with tokens
    rebuilt from G and the prefix tokens, so anything computed from G, and everything after the
    layer, depends on the input through G: a derivative w.r.t. G covers both paths. Other
    outputs: ValueError.
    """
    batch = x.shape[0]
    prefixes: dict[str, torch.Tensor | None] = {}

    def relay(name: str, output: object) -> tuple[object, object]:
        if isinstance(output, torch.Tensor) and output.ndim == 4:
            prefixes[name] = None
            return output, output.clone()
        if not isinstance(output, torch.Tensor) or output.ndim != 3:
            shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
            raise ValueError(f"layer {name!r} returns {shape}; needs activation maps (B, C, H, W) or ViT tokens (B, N, C)")
        grid, prefix, seq_first = _token_grid(model, name, output, batch)
        grid = grid.clone()  # its own tensor: the rebuilt tokens below are made from it
        prefixes[name] = prefix
        return grid, tokens_from_grid(grid, prefix, seq_first)

    result, maps = _capture(model, x, names, stop=False, relay=relay)
    return result, maps, prefixes


def _capture(
    model: nn.Module,
    x: torch.Tensor,
    names: Sequence[str],
    stop: bool,
    relay: Callable[[str, object], tuple[object, object]] | None = None,
) -> tuple[torch.Tensor | None, dict[str, object]]:
    """The forward with hooks behind the functions above: (output, {name: captured output}).

    `stop`: end the forward after the last layer (output None). Each output is captured as a
    clone (the network goes on with the output itself), or with `relay(name, output)` = (what to
    capture, what the network goes on with).
    """
    if isinstance(names, str) or len(names) == 0:
        raise ValueError(f"names must be a non-empty sequence of layer names, got {names!r}")
    wanted = {name: resolve_layer(model, name) for name in names}
    captured: dict[str, object] = {}

    def hook_for(name: str):
        def hook(module: nn.Module, args: tuple, output: object) -> object:
            if name in captured:
                raise ValueError(f"layer {name!r} runs more than once per forward; its output is ambiguous")
            if relay is not None:
                captured[name], passed = relay(name, output)
                return passed
            captured[name] = output.clone() if isinstance(output, torch.Tensor) else output
            if stop and len(captured) == len(wanted):
                raise _AllCaptured
            return None

        return hook

    handles = [module.register_forward_hook(hook_for(name)) for name, module in wanted.items()]
    result = None
    try:
        result = model(x)
    except _AllCaptured:
        pass
    finally:
        for handle in handles:
            handle.remove()
    missing = [name for name in wanted if name not in captured]
    if missing:
        raise ValueError(f"layers {missing} did not run in the forward pass of {type(model).__name__}")
    return result, {name: captured[name] for name in wanted}


def _feature_maps(model: nn.Module, captured: dict[str, object], batch: int) -> dict[str, torch.Tensor]:
    """Captured outputs as (B, C, h, w) maps, plus "<name>.cls" class tokens of ViT layers."""
    features: dict[str, torch.Tensor] = {}
    for name, output in captured.items():
        grid, cls = _as_feature_map(model, name, output, batch)
        features[name] = grid
        if cls is not None:
            features[f"{name}.cls"] = cls
    return features


class _Tracer(fx.Tracer):
    """fx tracer that keeps the split layer and B-cos modules (data-dependent asserts) opaque."""

    def __init__(self, cut: nn.Module):
        super().__init__()
        self._cut = cut

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return (
            module is self._cut
            or isinstance(module, (DetachableModule, LogitLayer))
            or super().is_leaf_module(module, qualified_name)
        )


def _ancestors(node: fx.Node, stop: fx.Node | None = None) -> set[fx.Node]:
    """`node` and every node it depends on, not walking past `stop`."""
    seen, todo = set(), [node]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        if current is not stop:
            todo.extend(current.all_input_nodes)
    return seen


def _subgraph(graph: fx.Graph, keep: set[fx.Node], inputs: dict[fx.Node, str], output: fx.Node) -> fx.Graph:
    """Copy the `keep` nodes of `graph` in order; `inputs` nodes become placeholders."""
    new = fx.Graph()
    env = {node: new.placeholder(label) for node, label in inputs.items()}
    for node in graph.nodes:
        if node in keep and node not in env and node.op != "output":
            env[node] = new.node_copy(node, lambda n: env[n])
    new.output(env[output])
    return new


def _defaults(model: nn.Module) -> dict[str, object]:
    """The forward's optional arguments at their defaults (timm's ViTs take attn_mask=None,
    is_causal=False): traced as constants, so only the image is an input of the graph."""
    parameters = list(inspect.signature(model.forward).parameters.values())[1:]
    return {p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty and p.kind is p.POSITIONAL_OR_KEYWORD}


def split_at(model: nn.Module, name: str) -> tuple[nn.Module, nn.Module]:
    """Split `model` at layer `name` into (head: x -> layer output, tail: layer output -> logits).

    Exact: both halves are the model's own traced operations and share its parameters, so
    tail(head(x)) == model(x). The tail takes the layer's raw output (ViT tokens stay (B, N, C))
    and, like the model, may modify it in place (e.g. a following ReLU(inplace=True)).
    ValueError if the model is not traceable by torch.fx, if the layer runs more than once, or
    if the logits also depend on the input through a path that bypasses the layer (e.g. a
    residual connection around a layer inside a block): split at a block or stage output instead.
    """
    layer = resolve_layer(model, name)
    try:
        graph = _Tracer(layer).trace(model, concrete_args=_defaults(model))
    except Exception as error:  # fx raises many types (TraceError, TypeError, ...) for untraceable code
        raise ValueError(f"cannot split {type(model).__name__}: its forward is not traceable by torch.fx ({error})") from error
    cuts = [node for node in graph.nodes if node.op == "call_module" and node.target == name]
    if len(cuts) != 1:
        raise ValueError(f"cannot split at {name!r}: it runs {len(cuts)} times in the forward pass, need exactly once")
    cut = cuts[0]
    output = next(node for node in graph.nodes if node.op == "output").args[0]
    if not isinstance(output, fx.Node):
        raise ValueError(f"cannot split {type(model).__name__}: its forward returns {type(output).__name__}, not one tensor")
    tail_nodes = _ancestors(output, stop=cut)
    bypass = [node.name for node in tail_nodes if node.op == "placeholder"]
    if bypass:
        raise ValueError(
            f"cannot split at {name!r}: the logits also depend on the input ({', '.join(bypass)}) through a path "
            f"that bypasses it, such as a residual connection; split at a block or stage output "
            f"(for ResNets e.g. 'layer3' or 'layer3.1')"
        )
    head_nodes = _ancestors(cut)
    placeholders = {node: node.target for node in graph.nodes if node.op == "placeholder" and node in head_nodes}
    head = fx.GraphModule(model, _subgraph(graph, head_nodes, placeholders, cut))
    tail = fx.GraphModule(model, _subgraph(graph, tail_nodes, {cut: "features"}, output))
    return head.train(model.training), tail.train(model.training)
