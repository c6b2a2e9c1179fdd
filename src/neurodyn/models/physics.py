"""Physics-structured vector fields: Hamiltonian (``HNN``), port-Hamiltonian and Lagrangian (``LNN``) networks,
and the plain network baseline (``DerivativeMLP``).

Each is an ``nn.Module`` vector field: ``time_derivative(x)`` gives ``dx/dt`` for a batch of states ``x`` of shape
``(..., 2d)``, and ``forward(t, x)`` is the same field in :func:`neurodyn.solve`'s ``f(t, y)`` form, so a model
is trained on derivatives (``time_derivative`` against observed ``dx/dt``, as in Greydanus et al. 2019) or on
trajectories (``neurodyn.solve(model, x0, t, gradient=...)`` with any gradient method), and integrated by any
method: the symplectic ``leapfrog`` / ``yoshida4`` for a separable ``H`` (the whole field, or its halves as
:meth:`HNN.split_term`), ``implicit_midpoint`` / ``gl4`` / ``gl6`` (symplectic Gauss--Legendre) for any ``H``.

Derivatives of the learned scalar (``dH/dx``, the Lagrangian's gradient and Hessian) are taken with autograd and
``torch.func`` (``grad``, ``jacrev``, ``hessian``, ``vmap``), the LNN's for the :func:`mlp` network in closed form:
the result stays differentiable in the parameters and in ``x`` (training, the adjoint's vector-Jacobian products, an
implicit method's Jacobian by ``torch.func.jacrev``), under ``torch.no_grad`` too. The scalar network must treat the
rows of a batch independently (no batch normalisation): ``dH/dx`` is the gradient of the batch's sum
(:func:`scalar_gradient`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..core.term import SplitTerm
from ..errors import InputError

NONLINEARITIES: dict[str, Callable[[], nn.Module]] = {
    "tanh": nn.Tanh, "relu": nn.ReLU, "sigmoid": nn.Sigmoid, "softplus": nn.Softplus, "gelu": nn.GELU,
    "silu": nn.SiLU, "elu": nn.ELU,
}


def mlp(input_dim: int, hidden_dim: int, output_dim: int, nonlinearity: str = "tanh", layers: int = 3) -> nn.Sequential:
    """A fully connected network ``input_dim -> hidden_dim (x layers-1) -> output_dim`` with orthogonal weights
    (the HNN paper's ``MLP``: three linear layers, no activation after the last).

    >>> mlp(2, 16, 1)(torch.zeros(5, 2)).shape
    torch.Size([5, 1])
    """
    for name, v in (("input_dim", input_dim), ("hidden_dim", hidden_dim), ("output_dim", output_dim),
                    ("layers", layers)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise InputError(f"mlp: {name} must be a positive integer, got {v!r}.")
    if nonlinearity not in NONLINEARITIES:
        raise InputError(f"unknown nonlinearity {nonlinearity!r}; choose one of {', '.join(NONLINEARITIES)}.")
    dims = [input_dim] + [hidden_dim] * (layers - 1) + [output_dim]
    mods: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        lin = nn.Linear(a, b)
        nn.init.orthogonal_(lin.weight)
        mods.append(lin)
        if i < len(dims) - 2:
            mods.append(NONLINEARITIES[nonlinearity]())
    return nn.Sequential(*mods)


def _scalar(net: Callable[[Tensor], Tensor], x: Tensor, what: str) -> Tensor:
    """``net(x)`` as one scalar per row, shape ``x.shape[:-1]`` (accepts ``(..., 1)`` or ``(...)`` outputs)."""
    out = net(x)
    if not isinstance(out, Tensor):
        raise InputError(f"{what} network returned {type(out).__name__}, not a tensor.")
    if out.shape == x.shape[:-1] + (1,):
        return out.squeeze(-1)
    if out.shape == x.shape[:-1]:
        return out
    raise InputError(f"{what} network must return one scalar per state: shape {tuple(x.shape[:-1]) + (1,)} or "
                     f"{tuple(x.shape[:-1])} for input {tuple(x.shape)}, got {tuple(out.shape)}.")


def _check_state(x: Tensor, n: int | None, who: str) -> None:
    if not isinstance(x, Tensor):
        raise InputError(f"{who}: x must be a tensor of shape (..., 2d), got {type(x).__name__}.")
    if x.dim() == 0 or x.shape[-1] % 2:
        raise InputError(f"{who}: the state's last dimension must hold the two halves (q, p) or (q, qdot), an even "
                         f"size, got shape {tuple(x.shape)}.")
    if n is not None and x.shape[-1] != n:
        raise InputError(f"{who}: the state's last dimension must be {n} (input_dim), got shape {tuple(x.shape)}.")


def scalar_gradient(fn: Callable[[Tensor], Tensor], x: Tensor, create_graph: bool | None = None) -> Tensor:
    """``d(sum fn(x))/dx``, shape ``x.shape``. Plain autograd for ordinary tensors, differentiable (``create_graph``)
    when ``create_graph`` is true and grad mode is on (default: when ``x`` requires grad); ``torch.func.grad`` inside
    ``torch.func`` transforms (``vmap``, ``jacrev``: an implicit method's Jacobian), where autograd cannot reach.

    >>> scalar_gradient(lambda z: (z ** 2).sum(-1), torch.tensor([[1.0, 2.0]]))
    tensor([[2., 4.]])
    """
    if torch._C._functorch.is_functorch_wrapped_tensor(x):
        return torch.func.grad(lambda z: fn(z).sum())(x)
    outer = torch.is_grad_enabled() and (x.requires_grad if create_graph is None else create_graph)
    with torch.enable_grad():
        xg = x if x.requires_grad else x.detach().requires_grad_(True)
        out = fn(xg).sum()
        if not out.requires_grad:  # fn does not depend on x (nor on anything needing grad)
            return torch.zeros_like(x)
        (g,) = torch.autograd.grad(out, xg, create_graph=outer, allow_unused=True)
    return torch.zeros_like(x) if g is None else g


def symplectic_gradient(dH: Tensor) -> Tensor:
    """``J dH``: ``(dH/dp, -dH/dq)`` for ``dH = (dH/dq, dH/dp)`` of shape ``(..., 2d)``.

    >>> symplectic_gradient(torch.tensor([1.0, 2.0]))
    tensor([ 2., -1.])
    """
    d = dH.shape[-1] // 2
    return torch.cat([dH[..., d:], -dH[..., :d]], -1)


class HNN(nn.Module):
    """Hamiltonian neural network: a scalar ``H(q, p)`` whose symplectic gradient is the vector field,
    ``dq/dt = dH/dp``, ``dp/dt = -dH/dq``; optionally port-Hamiltonian, ``dx/dt = (J - R) grad H``.

    Parameters
    ----------
    input_dim : int, optional
        ``2d``, the size of the state ``x = (q, p)`` (``d`` degrees of freedom). With ``hamiltonian=None`` the
        scalar network is :func:`mlp` ``(input_dim, hidden_dim, 1, nonlinearity)``.
    hidden_dim : int
        Hidden width of the built network(s) (the paper's 200).
    nonlinearity : str
        ``"tanh"`` (default), ``"softplus"``, ``"relu"`` (whose second derivative is zero: a poor choice), ...
    hamiltonian : callable, optional
        A given ``H``: ``(..., 2d) -> (..., 1)`` or ``(...)`` (an ``nn.Module``: its parameters are learned).
    separable : bool
        Learn ``H = T(p) + V(q)`` with two networks ``T: (..., d) -> scalar`` and ``V: (..., d) -> scalar`` (or
        give them as ``kinetic=`` / ``potential=``); then :meth:`split_term` gives the halves as a
        :class:`~neurodyn.SplitTerm` for the symplectic steppers.
    kinetic, potential : callable, optional
        Given ``T(p)`` and ``V(q)`` (imply ``separable=True``).
    dissipation : bool, Tensor or callable
        Port-Hamiltonian damping on the momenta: ``dp/dt = -dH/dq - D(x) dH/dp`` with ``D = L L^T`` (positive
        semi-definite, so ``dH/dt = -(dH/dp)^T D dH/dp <= 0``). ``True``: a learned constant lower-triangular
        ``L`` (``d x d``, initialised to ``dissipation_init * I``); a tensor: that fixed ``L`` (``d x d``); a
        callable ``x (..., 2d) -> L (..., d, d)``: a state-dependent learned ``L``. ``False`` (default): ``R = 0``.

    Notes
    -----
    Shapes: ``time_derivative(x)``, ``forward(t, x)``: ``(..., 2d) -> (..., 2d)``; ``energy(x)``: ``(..., 2d) ->
    (...)``.

    Examples
    --------
    A pendulum's ``H`` given in closed form; its field is recovered exactly:

    >>> import torch, neurodyn
    >>> H = lambda x: 0.5 * x[..., 1] ** 2 - torch.cos(x[..., 0])
    >>> hnn = neurodyn.models.HNN(hamiltonian=H)
    >>> x = torch.tensor([[0.3, -0.2]], dtype=torch.float64)
    >>> hnn.time_derivative(x)      # (p, -sin q)
    tensor([[-0.2000, -0.2955]], dtype=torch.float64)

    A learned ``H`` (200 tanh units) trained on derivatives, then rolled out with a symplectic method:

    >>> model = neurodyn.models.HNN(2, 200).double()
    >>> opt = torch.optim.Adam(model.parameters(), 1e-3)
    >>> x = torch.randn(64, 2, dtype=torch.float64); dxdt = torch.cat([x[:, 1:], -x[:, :1]], -1)
    >>> loss = (model.time_derivative(x) - dxdt).pow(2).mean(); loss.backward(); opt.step()
    >>> sol = neurodyn.solve(model, x[:4], torch.linspace(0, 1, 11, dtype=torch.float64), method="gl4",
    ...                      step_size=0.1)
    >>> sol.ys.shape
    torch.Size([11, 4, 2])
    """

    def __init__(self, input_dim: int | None = None, hidden_dim: int = 200, nonlinearity: str = "tanh", *,
                 hamiltonian: Callable[[Tensor], Tensor] | None = None, separable: bool = False,
                 kinetic: Callable[[Tensor], Tensor] | None = None,
                 potential: Callable[[Tensor], Tensor] | None = None,
                 dissipation: bool | Tensor | Callable[[Tensor], Tensor] = False, dissipation_init: float = 0.1):
        super().__init__()
        if input_dim is not None and (not isinstance(input_dim, int) or isinstance(input_dim, bool)
                                      or input_dim < 2 or input_dim % 2):
            raise InputError(f"HNN: input_dim must be an even integer >= 2 (the size of (q, p)), got {input_dim!r}.")
        separable = separable or kinetic is not None or potential is not None
        if hamiltonian is not None and separable:
            raise InputError("HNN: give either hamiltonian= (a whole H(q, p)) or the separable halves "
                             "(kinetic= / potential= or separable=True), not both.")
        self.input_dim = input_dim
        self.separable = separable
        if separable:
            need = (kinetic is None or potential is None)
            if need and input_dim is None:
                raise InputError("HNN(separable=True) builds T(p) and V(q) networks of size d = input_dim / 2: "
                                 "give input_dim, or both kinetic= and potential=.")
            d = input_dim // 2 if input_dim is not None else None
            self.kinetic = kinetic if kinetic is not None else mlp(d, hidden_dim, 1, nonlinearity)
            self.potential = potential if potential is not None else mlp(d, hidden_dim, 1, nonlinearity)
            self.hamiltonian = None
        else:
            if hamiltonian is None and input_dim is None:
                raise InputError("HNN: give input_dim (to build an H network) or hamiltonian= (a given H network).")
            if hamiltonian is not None and not callable(hamiltonian):
                raise InputError(f"HNN: hamiltonian must be callable x -> H(x), got {type(hamiltonian).__name__}.")
            self.hamiltonian = hamiltonian if hamiltonian is not None else mlp(input_dim, hidden_dim, 1,
                                                                               nonlinearity)
            self.kinetic = self.potential = None
        # Port-Hamiltonian dissipation on the momenta: D = L L^T.
        self.dissipation_net: Callable[[Tensor], Tensor] | None = None
        self.dissipation_factor: Tensor | None = None
        if dissipation is True:
            if input_dim is None:
                raise InputError("HNN(dissipation=True) learns a d x d factor: give input_dim.")
            d = input_dim // 2
            self.dissipation_factor = nn.Parameter(dissipation_init * torch.eye(d))
        elif isinstance(dissipation, Tensor):
            if dissipation.dim() != 2 or dissipation.shape[0] != dissipation.shape[1]:
                raise InputError(f"HNN: a dissipation tensor is the factor L (d x d) of D = L L^T, got shape "
                                 f"{tuple(dissipation.shape)}.")
            self.dissipation_factor = dissipation
        elif callable(dissipation) and dissipation is not False:
            self.dissipation_net = dissipation
        elif dissipation is not False:
            raise InputError(f"HNN: dissipation must be False, True, a d x d tensor or a callable x -> L(x), got "
                             f"{type(dissipation).__name__}.")

    # -- the scalar -----------------------------------------------------------------------------------------
    def energy(self, x: Tensor) -> Tensor:
        """``H(x)``, shape ``x.shape[:-1]``."""
        _check_state(x, self.input_dim, "HNN.energy")
        if self.separable:
            d = x.shape[-1] // 2
            return _scalar(self.kinetic, x[..., d:], "kinetic T(p)") + _scalar(self.potential, x[..., :d],
                                                                                "potential V(q)")
        return _scalar(self.hamiltonian, x, "Hamiltonian H(q, p)")

    def grad_energy(self, x: Tensor) -> Tensor:
        """``dH/dx = (dH/dq, dH/dp)``, shape ``x.shape`` (differentiable in ``x`` and the parameters)."""
        return scalar_gradient(self.energy, x, self._graph(x))

    # -- the field --------------------------------------------------------------------------------------------
    def time_derivative(self, x: Tensor) -> Tensor:
        """``dx/dt = (dH/dp, -dH/dq - D dH/dp)`` at the states ``x`` of shape ``(..., 2d)``; same shape."""
        _check_state(x, self.input_dim, "HNN.time_derivative")
        field = symplectic_gradient(self.grad_energy(x))
        if self.dissipation_factor is None and self.dissipation_net is None:
            return field
        d = x.shape[-1] // 2
        return torch.cat([field[..., :d], field[..., d:] - self.damping(x, field[..., :d])], -1)

    def damping(self, x: Tensor, dH_dp: Tensor) -> Tensor:
        """``D(x) dH/dp`` with ``D = L L^T`` (shape ``(..., d)``); zeros without dissipation."""
        if self.dissipation_factor is None and self.dissipation_net is None:
            return torch.zeros_like(dH_dp)
        L = self.dissipation_factor if self.dissipation_factor is not None else self.dissipation_net(x)
        L = torch.tril(L)
        v = (L.mT @ dH_dp.unsqueeze(-1))
        return (L @ v).squeeze(-1)

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        """The field in ``f(t, x)`` form (``t`` unused): ``neurodyn.solve(hnn, x0, t)``."""
        return self.time_derivative(x)

    # -- separable halves --------------------------------------------------------------------------------------
    def dq_dt(self, t: Tensor, p: Tensor) -> Tensor:
        """``dT/dp`` (separable ``H`` only), ``(..., d) -> (..., d)``."""
        self._need_separable("dq_dt")
        return scalar_gradient(lambda z: _scalar(self.kinetic, z, "kinetic T(p)"), p, self._graph(p))

    def dp_dt(self, t: Tensor, q: Tensor) -> Tensor:
        """``-dV/dq`` (separable ``H`` only), ``(..., d) -> (..., d)``."""
        self._need_separable("dp_dt")
        return -scalar_gradient(lambda z: _scalar(self.potential, z, "potential V(q)"), q, self._graph(q))

    def split_term(self) -> SplitTerm:
        """The field's halves as a :class:`~neurodyn.SplitTerm` (separable ``H`` without dissipation), for
        ``leapfrog`` / ``yoshida4`` / ``semi_implicit_euler``: each kick or drift evaluates one half only.

        >>> import torch, neurodyn
        >>> hnn = neurodyn.models.HNN(kinetic=lambda p: 0.5 * p.pow(2).sum(-1),
        ...                           potential=lambda q: -torch.cos(q).sum(-1))
        >>> y0 = torch.tensor([1.0, 0.0], dtype=torch.float64)
        >>> sol = neurodyn.solve(hnn.split_term(), y0, torch.linspace(0, 10, 3, dtype=torch.float64),
        ...                      method="leapfrog", step_size=0.01)
        >>> bool((hnn.energy(sol.ys) - hnn.energy(y0)).abs().max() < 1e-4)
        True
        """
        self._need_separable("split_term")
        if self.dissipation_factor is not None or self.dissipation_net is not None:
            raise InputError("HNN.split_term: a port-Hamiltonian field with dissipation is not a separable "
                             "Hamiltonian system; integrate the whole model (e.g. method='gl4' or 'dopri5').")
        return SplitTerm(self.dq_dt, self.dp_dt)

    def _graph(self, x: Tensor) -> bool:
        """Whether ``dH/dx`` must stay differentiable: ``x`` or a parameter of this module requires grad (tensors a
        given ``H`` closure captures are not seen: make such an ``H`` an ``nn.Module``)."""
        return x.requires_grad or any(p.requires_grad for p in self.parameters())

    def _need_separable(self, what: str) -> None:
        if not self.separable:
            raise InputError(f"HNN.{what} needs a separable H = T(p) + V(q): build the HNN with separable=True or "
                             f"kinetic= / potential=. A non-separable H runs with implicit_midpoint, gl4 or gl6.")


def _activation_derivatives(act: nn.Module, a: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(h, h', h'')`` of an activation module at pre-activations ``a`` (``tanh``, ``softplus``, ``sigmoid``)."""
    if isinstance(act, nn.Tanh):
        h = torch.tanh(a)
        s1 = 1 - h * h
        return h, s1, -2 * h * s1
    if isinstance(act, nn.Sigmoid):
        h = torch.sigmoid(a)
        s1 = h * (1 - h)
        return h, s1, s1 * (1 - 2 * h)
    # nn.Softplus(beta, threshold): linear above a * beta > threshold
    sig = torch.sigmoid(act.beta * a)
    linear = act.beta * a > act.threshold
    h = nn.functional.softplus(a, act.beta, act.threshold)
    s1 = torch.where(linear, torch.ones_like(sig), sig)
    s2 = torch.where(linear, torch.zeros_like(sig), act.beta * sig * (1 - sig))
    return h, s1, s2


def _closed_form_mlp(net: object) -> bool:
    """Whether ``net`` is ``Linear (act Linear)*`` with a closed-form activation and one output."""
    if not isinstance(net, nn.Sequential) or len(net) < 3 or len(net) % 2 == 0:
        return False
    mods = list(net)
    return (all(isinstance(m, nn.Linear) for m in mods[0::2])
            and all(isinstance(m, (nn.Tanh, nn.Sigmoid, nn.Softplus)) for m in mods[1::2])
            and mods[-1].out_features == 1)


def mlp_gradient_and_qdot_jacobian(net: nn.Sequential, x: Tensor) -> tuple[Tensor, Tensor]:
    """For a scalar MLP ``L = net(x)`` (``nn.Linear`` layers with ``tanh`` / ``softplus`` / ``sigmoid`` between
    them, one output) at states ``x = (q, qdot)`` of shape ``(N, 2d)``: the gradient ``g = dL/dx`` ``(N, 2d)`` and
    ``J = dg/dqdot`` ``(N, 2d, d)`` (the ``qdot`` columns of the Hessian), in closed form and batched over rows.

    Forward over reverse by hand: the forward pass carries the ``d`` tangents of the pre-activations along ``qdot``
    (``T_1 = W_1[:, d:]``, ``T_{k+1} = W_{k+1} (h'(a_k) T_k)``), the reverse pass the adjoints ``delta_k`` and their
    tangents (``h''(a_k) T_k delta_k + h'(a_k) dT``); differentiable in the parameters and in ``x``.

    >>> import torch
    >>> net = mlp(4, 16, 1, "softplus").double()
    >>> x = torch.randn(3, 4, dtype=torch.float64)
    >>> g, J = mlp_gradient_and_qdot_jacobian(net, x)
    >>> H = torch.func.vmap(torch.func.hessian(lambda z: net(z).squeeze(-1)))(x)
    >>> bool(torch.allclose(J, H[:, :, 2:], atol=1e-12)), g.shape, J.shape
    (True, torch.Size([3, 4]), torch.Size([3, 4, 2]))
    """
    if not _closed_form_mlp(net):
        raise InputError("mlp_gradient_and_qdot_jacobian: net must be an nn.Sequential of nn.Linear layers with "
                         "nn.Tanh / nn.Softplus / nn.Sigmoid between them and one output (e.g. mlp(2d, h, 1)).")
    if not isinstance(x, Tensor) or x.dim() != 2 or x.shape[-1] != net[0].in_features or x.shape[-1] % 2:
        raise InputError(f"mlp_gradient_and_qdot_jacobian: x must be a tensor (N, 2d) with 2d = the network's input "
                         f"size {net[0].in_features} (even), got "
                         f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}.")
    lins, acts = list(net)[0::2], list(net)[1::2]
    d = x.shape[-1] // 2
    a = nn.functional.linear(x, lins[0].weight, lins[0].bias)
    T = lins[0].weight[:, d:].mT.expand(x.shape[0], -1, -1)   # (N, d, m): d a_1 / d qdot_j in row j
    cache = []
    for act, lin in zip(acts, lins[1:]):
        h, s1, s2 = _activation_derivatives(act, a)
        cache.append((s1, s2, T))
        a = nn.functional.linear(h, lin.weight, lin.bias)
        T = (s1.unsqueeze(-2) * T) @ lin.weight.mT           # one (N d, m) x (m, m') product
    delta = lins[-1].weight[0].expand(x.shape[0], -1)      # dL/dh of the last hidden layer, (N, m)
    ddelta: Tensor | None = None                          # its tangents along qdot, (N, d, m)
    for (s1, s2, Tk), lin in zip(reversed(cache), reversed(lins[:-1])):
        da = s1 * delta
        dda = (s2 * delta).unsqueeze(-2) * Tk
        if ddelta is not None:
            dda = dda + s1.unsqueeze(-2) * ddelta
        delta = da @ lin.weight
        ddelta = dda @ lin.weight
    assert ddelta is not None
    return delta, ddelta.mT


class LNN(nn.Module):
    """Lagrangian neural network: a scalar ``L(q, qdot)``; the accelerations solve the Euler--Lagrange equations

        ``A qddot = dL/dq - B qdot``,   ``A = d2L/dqdot2`` (``d x d``),   ``B = d2L/(dqdot dq)`` (``d x d``).

    Only the ``qdot`` columns of the Hessian are formed: ``J = d(dL/dx)/dqdot`` (``2d x d``), whose lower block is
    ``A`` and upper block ``B^T``. For the network :func:`mlp` builds (an ``nn.Sequential`` of ``nn.Linear`` layers
    with ``tanh``, ``softplus`` or ``sigmoid`` between them and one output) the gradient and ``J`` come in closed
    form, batched over the rows: one forward pass carrying the ``d`` tangents along ``qdot`` and one reverse pass
    with their derivatives (:func:`mlp_gradient_and_qdot_jacobian`); for any other ``L``, by ``torch.func``
    (``jacfwd`` along ``qdot`` over ``jacrev``, under ``vmap`` over the batch).

    Ill-conditioned ``A`` (a learned ``L`` nearly degenerate in ``qdot``): the solve is Tikhonov-regularised,
    ``qddot = (A^T A + lam^2 I)^{-1} A^T b`` with ``lam = regularization * ||A||_F``. For ``cond(A) <<
    1 / regularization`` this is the plain solve up to a relative ``(regularization * cond(A))^2``; for a
    singular ``A`` it stays finite (directions with eigenvalues below ``lam`` are damped, not amplified).
    ``regularization`` defaults to the square root of the dtype's machine epsilon (float64 1.5e-8, float32
    3.5e-4). With ``warn=True`` a ``RuntimeWarning`` names the worst ``cond(A)`` of a batch when it exceeds
    ``1 / regularization`` (a host sync per call; ``warn=False`` for speed); the worst condition number of the
    last call is kept in ``last_condition``.

    Parameters
    ----------
    input_dim : int, optional
        ``2d``: the state ``x = (q, qdot)``. With ``lagrangian=None``: :func:`mlp` ``(input_dim, hidden_dim, 1,
        nonlinearity)`` (``softplus`` by default: ``tanh``'s Hessian in ``qdot`` is often near-singular at start).
    lagrangian : callable, optional
        A given ``L``: ``(..., 2d) -> (..., 1)`` or ``(...)``.

    Notes
    -----
    Shapes: ``accelerations(x)``: ``(..., 2d) -> (..., d)``; ``time_derivative(x)``, ``forward(t, x)``:
    ``(..., 2d) -> (..., 2d)``; ``energy(x)`` (``qdot . dL/dqdot - L``): ``(..., 2d) -> (...)``.

    Examples
    --------
    >>> import torch, neurodyn
    >>> L = lambda x: 0.5 * x[..., 1] ** 2 + torch.cos(x[..., 0])     # pendulum: qddot = -sin q
    >>> lnn = neurodyn.models.LNN(lagrangian=L)
    >>> lnn.time_derivative(torch.tensor([[0.5, 1.0]], dtype=torch.float64))
    tensor([[ 1.0000, -0.4794]], dtype=torch.float64)
    """

    def __init__(self, input_dim: int | None = None, hidden_dim: int = 200, nonlinearity: str = "softplus", *,
                 lagrangian: Callable[[Tensor], Tensor] | None = None, regularization: float | None = None,
                 warn: bool = True):
        super().__init__()
        if input_dim is not None and (not isinstance(input_dim, int) or isinstance(input_dim, bool)
                                      or input_dim < 2 or input_dim % 2):
            raise InputError(f"LNN: input_dim must be an even integer >= 2 (the size of (q, qdot)), got "
                             f"{input_dim!r}.")
        if lagrangian is None and input_dim is None:
            raise InputError("LNN: give input_dim (to build an L network) or lagrangian= (a given L network).")
        if lagrangian is not None and not callable(lagrangian):
            raise InputError(f"LNN: lagrangian must be callable x -> L(x), got {type(lagrangian).__name__}.")
        if regularization is not None and not (isinstance(regularization, (int, float))
                                               and 0 <= regularization < 1 and math.isfinite(regularization)):
            raise InputError(f"LNN: regularization must be a number in [0, 1), got {regularization!r}.")
        self.input_dim = input_dim
        self.lagrangian = lagrangian if lagrangian is not None else mlp(input_dim, hidden_dim, 1, nonlinearity)
        self.regularization = regularization
        self.warn = warn
        #: The worst cond(d2L/dqdot2) of the last checked call (``warn=True``), else None.
        self.last_condition: float | None = None

    def _L1(self, x1: Tensor) -> Tensor:
        return _scalar(self.lagrangian, x1.unsqueeze(0), "Lagrangian L(q, qdot)").squeeze(0)

    def lagrangian_value(self, x: Tensor) -> Tensor:
        """``L(x)``, shape ``x.shape[:-1]``."""
        _check_state(x, self.input_dim, "LNN")
        return _scalar(self.lagrangian, x, "Lagrangian L(q, qdot)")

    def _derivatives(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``g = dL/dx`` ``(N, 2d)`` and ``J = dg/dqdot`` ``(N, 2d, d)`` at the rows of ``x`` (flattened)."""
        flat = x.reshape(-1, x.shape[-1])
        d = flat.shape[-1] // 2
        if _closed_form_mlp(self.lagrangian):
            return mlp_gradient_and_qdot_jacobian(self.lagrangian, flat)

        def grad_twice(qdot: Tensor, q: Tensor) -> tuple[Tensor, Tensor]:
            g = torch.func.jacrev(self._L1)(torch.cat([q, qdot]))
            return g, g

        def one(z: Tensor) -> tuple[Tensor, Tensor]:
            J, g = torch.func.jacfwd(grad_twice, has_aux=True)(z[d:], z[:d])
            return g, J

        return torch.func.vmap(one)(flat)

    def accelerations(self, x: Tensor) -> Tensor:
        """``qddot`` from the Euler--Lagrange equations at ``x = (q, qdot)`` of shape ``(..., 2d)``; shape
        ``(..., d)``."""
        _check_state(x, self.input_dim, "LNN.accelerations")
        d = x.shape[-1] // 2
        g, J = self._derivatives(x)
        flat = x.reshape(-1, 2 * d)
        A = J[:, d:, :]    # d2L/dqdot2
        Bt = J[:, :d, :]   # B^T, B = d2L/(dqdot dq)
        b = g[:, :d] - (flat[:, d:].unsqueeze(-2) @ Bt).squeeze(-2)
        return self.regularized_solve(A, b).reshape(*x.shape[:-1], d)

    def regularized_solve(self, A: Tensor, b: Tensor) -> Tensor:
        """``(A^T A + lam^2 I)^{-1} A^T b`` with ``lam = regularization * ||A||_F`` per row (see the class
        docstring); ``A`` of shape ``(N, d, d)``, ``b`` ``(N, d)``; returns ``(N, d)``."""
        eps = self.regularization if self.regularization is not None else math.sqrt(torch.finfo(A.dtype).eps)
        if self.warn and eps > 0 and not torch._C._functorch.is_functorch_wrapped_tensor(A):
            with torch.no_grad():
                cond = torch.linalg.cond(A.detach())
                worst = float(torch.nan_to_num(cond, nan=math.inf).max()) if cond.numel() else 0.0
            self.last_condition = worst
            if worst > 1.0 / eps:
                warnings.warn(f"LNN: the Hessian d2L/dqdot2 is ill-conditioned (cond > 1/regularization = "
                              f"{1.0 / eps:.3g}; the worst of this call is in lnn.last_condition); the accelerations "
                              f"are Tikhonov-regularised (lam = regularization * ||A||_F), not the exact "
                              f"Euler-Lagrange solution.", RuntimeWarning, stacklevel=3)
        At = A.mT
        lam = eps * torch.linalg.matrix_norm(A)  # (N,)
        eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
        M = At @ A + (lam * lam)[:, None, None] * eye
        return torch.linalg.solve(M, (At @ b.unsqueeze(-1))).squeeze(-1)

    def time_derivative(self, x: Tensor) -> Tensor:
        """``dx/dt = (qdot, qddot)``, shape ``x.shape``."""
        d = x.shape[-1] // 2 if isinstance(x, Tensor) and x.dim() else 0
        return torch.cat([x[..., d:], self.accelerations(x)], -1)

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        """The field in ``f(t, x)`` form (``t`` unused)."""
        return self.time_derivative(x)

    def energy(self, x: Tensor) -> Tensor:
        """The conserved energy of ``L``, ``qdot . dL/dqdot - L``, shape ``x.shape[:-1]``."""
        _check_state(x, self.input_dim, "LNN.energy")
        d = x.shape[-1] // 2
        g = scalar_gradient(lambda z: _scalar(self.lagrangian, z, "Lagrangian L(q, qdot)"), x)
        return (x[..., d:] * g[..., d:]).sum(-1) - self.lagrangian_value(x)


class DerivativeMLP(nn.Module):
    """The plain baseline: a network that outputs ``dx/dt`` directly (the HNN paper's "baseline NN"), with the
    same interface as :class:`HNN` (``time_derivative(x)``, ``forward(t, x)``).

    Shapes: ``(..., input_dim) -> (..., input_dim)``.

    >>> import torch
    >>> DerivativeMLP(2, 200)(torch.tensor(0.0), torch.zeros(5, 2)).shape
    torch.Size([5, 2])
    """

    def __init__(self, input_dim: int, hidden_dim: int = 200, nonlinearity: str = "tanh"):
        super().__init__()
        self.input_dim = input_dim
        self.net = mlp(input_dim, hidden_dim, input_dim, nonlinearity)

    def time_derivative(self, x: Tensor) -> Tensor:
        """``dx/dt``, shape ``x.shape``."""
        if not isinstance(x, Tensor) or x.dim() == 0 or x.shape[-1] != self.input_dim:
            raise InputError(f"DerivativeMLP: x must have last dimension {self.input_dim}, got "
                             f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}.")
        return self.net(x)

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        """The field in ``f(t, x)`` form (``t`` unused)."""
        return self.time_derivative(x)


__all__ = ["DerivativeMLP", "HNN", "LNN", "mlp", "mlp_gradient_and_qdot_jacobian", "scalar_gradient",
           "symplectic_gradient"]
