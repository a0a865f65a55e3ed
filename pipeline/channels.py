"""Channel groups of a network, found by tracing it: what must be permuted or removed together.

A channel group is one channel space: the output channels of the convs that write it (several when
residual additions merge streams), the per-channel modules on it (BatchNorm), and the input channels
of every conv/linear that reads it (a linear layer after a flatten reads each channel at every spatial
position: features c*S .. c*S + S-1 of its input, S = H*W, as torch.flatten orders NCHW). Permuting a group consistently leaves the function unchanged;
removing channel c of a group removes filter c of each producer, entry c of each BatchNorm and input
slice c of each consumer.

rsp finds groups with torch.fx over its own registry models instead of depending on Torch-Pruning's
dependency graph: the registry is small and known, the tracer is ~100 lines with no extra package,
and the result maps directly onto the registry's width kwargs (cfg, channels, block_channels) so a
shrunk network is rebuilt from plain JSON.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn as nn

PASS_THROUGH = (nn.ReLU, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Flatten, nn.Identity)


@dataclass
class ChannelGroup:
    producers: list[str] = field(default_factory=list)  # convs writing these channels (output dim 0)
    norms: list[str] = field(default_factory=list)  # BatchNorms on these channels
    consumers: list[str] = field(default_factory=list)  # conv/linear reading them (input dim 1)
    size: int = 0
    merged: bool = False  # a residual addition joins several producers
    post_bn_relu: bool = False  # single producer -> BN -> ReLU -> consumers (zero filters give relu(bn(0)))
    post_relu: bool = False  # single producer -> ReLU -> consumers, no norm (a hidden linear: zero rows give relu(bias))
    # consumer -> input features per channel: 1 for a conv, H*W for a linear reading a flattened H x W map
    features_per_channel: dict[str, int] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.producers[0] if self.producers else "input"


class _UnionFind:
    def __init__(self):
        self.parent: dict[int, int] = {}

    def find(self, a: int) -> int:
        self.parent.setdefault(a, a)
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def union(self, a: int, b: int) -> None:
        self.parent[self.find(a)] = self.find(b)


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return type(m).__name__ == "Normalize" or super().is_leaf_module(m, qualname)


def channel_groups(model: nn.Module) -> list[ChannelGroup]:
    """Trace the model and return its channel groups (the network input's channels excluded)."""
    gm = fx.GraphModule(model, _Tracer().trace(model))
    modules = dict(gm.named_modules())
    space: dict[fx.Node, int] = {}  # node -> channel-space id
    uf = _UnionFind()
    producer_of: dict[int, list[str]] = {}
    norms_of: dict[int, list[str]] = {}
    consumers_of: dict[int, list[str]] = {}
    adds: set[int] = set()
    input_space = -1
    next_id = 0
    chain: dict[str, list[type]] = {}  # producer -> module types applied before the first consumer

    for node in gm.graph.nodes:
        if node.op == "placeholder":
            space[node] = input_space
        elif node.op == "call_module":
            mod = modules[node.target]
            src = space.get(node.args[0]) if node.args and isinstance(node.args[0], fx.Node) else None
            if isinstance(mod, (nn.Conv2d, nn.Linear)):
                if src is not None:
                    consumers_of.setdefault(src, []).append(node.target)
                space[node] = next_id
                producer_of[next_id] = [node.target]
                chain[node.target] = []
                next_id += 1
            elif isinstance(mod, nn.BatchNorm2d):
                norms_of.setdefault(src, []).append(node.target)
                space[node] = src
            elif isinstance(mod, PASS_THROUGH) or type(mod).__name__ == "Normalize":
                space[node] = src
            else:
                raise TypeError(f"cannot trace channels through {type(mod).__name__} ({node.target})")
        elif node.op == "call_function" and node.target in (operator.add, torch.add):
            a, b = (space[x] for x in node.args[:2])
            uf.union(a, b)
            adds.add(a)
            adds.add(b)
            space[node] = a
        elif node.op == "call_function" and node.target in (torch.flatten, torch.relu, torch.nn.functional.relu):
            space[node] = space[node.args[0]]
        elif node.op == "output":
            continue
        else:
            raise TypeError(f"cannot trace channels through {node.op} {node.target}")

    # Is each single producer followed by exactly BN then ReLU (a conv) or by a ReLU (a linear) before anything
    # reads it?
    bn_relu: set[str] = set()
    relu_only: set[str] = set()
    is_relu = lambda n: n.op == "call_module" and isinstance(modules[n.target], nn.ReLU)
    for node in gm.graph.nodes:
        if node.op != "call_module" or len(node.users) != 1:
            continue
        nxt = next(iter(node.users))
        if isinstance(modules[node.target], nn.Conv2d):
            if nxt.op == "call_module" and isinstance(modules[nxt.target], nn.BatchNorm2d) and len(nxt.users) == 1:
                if is_relu(next(iter(nxt.users))):
                    bn_relu.add(node.target)
        elif isinstance(modules[node.target], nn.Linear) and is_relu(nxt):
            relu_only.add(node.target)

    groups: dict[int, ChannelGroup] = {}
    for sid in set(list(producer_of) + list(norms_of) + list(consumers_of)):
        if sid == input_space:
            continue
        root = uf.find(sid)
        g = groups.setdefault(root, ChannelGroup())
        g.producers += producer_of.get(sid, [])
        g.norms += norms_of.get(sid, [])
        g.consumers += consumers_of.get(sid, [])
        g.merged |= sid in adds
    out = []
    for g in groups.values():
        if not g.producers:
            continue
        first = modules[g.producers[0]]
        g.size = first.out_channels if isinstance(first, nn.Conv2d) else first.out_features
        if not g.consumers:  # the logits
            continue
        single = not g.merged and len(g.producers) == 1
        g.post_bn_relu = single and g.producers[0] in bn_relu
        g.post_relu = single and not g.norms and g.producers[0] in relu_only
        for name in g.consumers:
            mod = modules[name]
            n_in = mod.in_channels if isinstance(mod, nn.Conv2d) else mod.in_features
            if n_in % g.size or (isinstance(mod, nn.Conv2d) and n_in != g.size):
                raise TypeError(f"{name} reads {n_in} inputs from {g.size} channels of {g.name}")
            g.features_per_channel[name] = n_in // g.size
        out.append(g)
    return out


def select_channels(state: dict[str, torch.Tensor], groups: list[ChannelGroup],
                    selection: dict[int, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Apply an index selection per group (a permutation, or the channels to keep) to a state_dict."""
    state = dict(state)
    for gi, idx in selection.items():
        g = groups[gi]
        for name in g.producers:
            state[f"{name}.weight"] = state[f"{name}.weight"].index_select(0, idx)
            if f"{name}.bias" in state:
                state[f"{name}.bias"] = state[f"{name}.bias"].index_select(0, idx)
        for name in g.norms:
            for leaf in ("weight", "bias", "running_mean", "running_var"):
                if f"{name}.{leaf}" in state:
                    state[f"{name}.{leaf}"] = state[f"{name}.{leaf}"].index_select(0, idx)
        for name in g.consumers:
            per = g.features_per_channel.get(name, 1)
            cols = (idx[:, None] * per + torch.arange(per, device=idx.device)).reshape(-1) if per > 1 else idx
            state[f"{name}.weight"] = state[f"{name}.weight"].index_select(1, cols)
    return state
