"""Scratch buffers of a compiled ``while_loop`` allocated once per call instead of once per iteration (internal).

Inductor's C++ wrapper (``cpp_wrapper=True``, torch 2.13) writes a ``while_loop`` as ``while (1) { ... }`` around the
condition's and the body's code, inlined; every buffer those allocate (``aoti_torch_empty_strided``: a tensor
object, its storage and its data, each a ``malloc``) is allocated and freed again at every iteration (36 per
attempted step in the small protocol case), and every input of the condition and the body gets a new tensor handle
at every iteration. :func:`pool_loop_buffers` rewrites the generated wrapper code so that such a buffer is allocated
once, before the outermost loop, and the loop takes a reference to it; and an input's handle becomes a reference to
the handle it was copied from. (The small protocol case's ``solve(compile=True)``: 0.71-0.73x the CPU time.) The
loop's carried values (the condition's result, the body's outputs: moved out of the iteration, so not pooled) are
recycled instead (:func:`_recycle_carried`): the buffer a carried value held during an iteration becomes the next
allocation of the buffer that replaces it, so two buffers per carried value alternate and no allocation is left per
iteration (the small case's compiled program called hot: 0.91x the CPU time).

A buffer (or an input's handle) is changed only where the code provably keeps it inside the iteration: each line
naming it, or a name derived from it (Inductor's ``// reuse`` moves and ``// alias`` views, handles made on it for a
nested loop's inputs), must be its declaration, a ``reset``, such a derivation, a kernel call that only passes its
data pointer, an ``aoti_torch_cpu_*_out`` library call, or a copy; any other use (a move into the loop's carried
values, a library call that may return a view of it, a size check) leaves it as it was. A pooled buffer's sizes and
strides must be compile-time constants (``static constexpr`` arrays) and it must be on the CPU. Performance only:
the kernels run on the same data in the same order, so outputs are bit-identical; code this does not recognise is
left unchanged.
"""

from __future__ import annotations

import math
import re

# Pooled buffers of one outermost loop hold at most this many bytes together (the rest are allocated per iteration as
# before): the pools live until the compiled call returns, where Inductor's own plan may reuse memory between them.
LOOP_POOL_BYTES = 8 << 20

_IDENT = r"[A-Za-z_]\w*"
_ALLOC = re.compile(r"^(\s*)AOTI_TORCH_ERROR_CODE_CHECK\(aoti_torch_empty_strided\((\d+), (" + _IDENT + r"), ("
                    + _IDENT + r"), (cached_torch_dtype_\w+), cached_torch_device_type_cpu, 0, &(" + _IDENT
                    + r")_handle\)\);$")
_ARRAY = re.compile(r"^\s*static constexpr int64_t (?:(" + _IDENT + r")\[\] = \{([^{}]*)\}|\*(" + _IDENT
                    + r")=nullptr);$")
_REUSE = re.compile(r"^\s*auto (" + _IDENT + r") = std::move\((" + _IDENT + r")\);\s*// reuse$")
_ALIAS = re.compile(r"^\s*auto (" + _IDENT + r") = wrap_with_raii_handle_if_needed\(reinterpret_tensor_wrapper\(("
                    + _IDENT + r"), [^;]*\)\);(?: (" + _IDENT + r")\.reset\(\);)?\s*// (?:alias|reuse)$")
_INPUT = re.compile(r"^(\s*)AOTI_TORCH_ERROR_CODE_CHECK\(aoti_torch_assign_tensors_out\((" + _IDENT + r"), &("
                    + _IDENT + r")_handle\)\);$")
_ASSIGN = re.compile(r"^\s*AOTI_TORCH_ERROR_CODE_CHECK\(aoti_torch_assign_tensors_out\((.*), &(" + _IDENT
                     + r")_handle\)\);$")
_DECLARE = re.compile(r"^\s*RAIIAtenTensorHandle ((" + _IDENT + r"))\(\1_handle\);$")
_RESET = re.compile(r"^\s*(" + _IDENT + r")\.reset\(\);$")
_KERNEL = re.compile(r"^\s*(" + _IDENT + r")\(.*\);$")
_SHIM_OUT = re.compile(r"^\s*AOTI_TORCH_ERROR_CODE_CHECK\(aoti_torch_(?:cpu_\w+_out|copy_)\(.*\)\);$")
_MOVE_OUT = re.compile(r"^(\s*)(" + _IDENT + r") = std::move\((" + _IDENT + r")\);$")
_LOCAL = re.compile(r"^\s*(?:auto&? |RAIIAtenTensorHandle |AtenTensorHandle |bool |const |static |int64_t )")
_DTYPE_BYTES = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4, "int16": 2,
                "int8": 1, "uint8": 1, "bool": 1, "complex64": 8, "complex128": 16}


def _word(name: str) -> re.Pattern:
    return re.compile(r"(?<![\w.])" + re.escape(name) + r"\b")


def _loop_end(lines: list[str], start: int) -> int | None:
    """Index of the line closing the ``while (1) {`` at ``start`` (braces counted), or None."""
    depth = 0
    for j in range(start, len(lines)):
        depth += lines[j].count("{") - lines[j].count("}")
        if depth == 0:
            return j
    return None


def _only_data_pointers(line: str, names: set[str]) -> bool:
    """Whether every mention of ``names`` in ``line`` reads a data pointer (``name.data_ptr()``)."""
    for name in names:
        rest = re.sub(r"(?<![\w.])" + re.escape(name) + r"\.data_ptr\(\)", "", line)
        if _word(name).search(rest):
            return False
    return True


def _references(name: str, region: list[str]) -> dict[int, str]:
    """Where the handle ``name`` (one allocation or one input handle of ``region``, whose uses :func:`_group` accepted)
    becomes a reference to a handle that outlives the loop: the lines of ``region`` (by index) that change. The
    handle and the names moved from it (``// reuse``) are references, so their ``reset`` lines go, and their moves
    become references; views of them (``// alias``) stay handles of their own."""
    refs = {name}
    new = {}
    for i, line in enumerate(region):
        m = _REUSE.match(line)
        if m and m.group(2) in refs:
            refs.add(m.group(1))
            moved, source = m.groups()
            new[i] = line.replace(f"auto {moved} = std::move({source});", f"auto& {moved} = {source};")
            continue
        m = _RESET.match(line)
        if m and m.group(1) in refs:
            new[i] = ""
            continue
        m = _ALIAS.match(line)
        if m and m.group(3) in refs:
            new[i] = line.replace(f" {m.group(3)}.reset();", "")
    return new


def _group(name: str, region: list[str]) -> set[str] | None:
    """``name`` and the names derived from it in ``region`` (reuse moves, alias views), or None where some line uses
    one of them in a way that may keep its storage past the iteration."""
    names = {name}
    changed = True
    while changed:
        changed = False
        for line in region:
            m = _REUSE.match(line) or _ALIAS.match(line)
            if m and m.group(2) in names and m.group(1) not in names:
                names.add(m.group(1))
                changed = True
            m = _ASSIGN.match(line)
            if m and m.group(2) not in names and any(_word(n).search(m.group(1)) for n in names):
                names.add(m.group(2))  # (a handle on it, or on a view of it: a nested loop's input)
                changed = True
    for line in region:
        if not any(_word(n).search(line) for n in names):
            continue
        m = _DECLARE.match(line) or _ASSIGN.match(line)
        if m and m.group(2) in names:
            continue
        m = _RESET.match(line)
        if m and m.group(1) in names:
            continue
        m = _REUSE.match(line) or _ALIAS.match(line)
        if m and m.group(2) in names:
            continue
        if _SHIM_OUT.match(line) and "std::move" not in line:
            continue
        m = _KERNEL.match(line)
        if m and not m.group(1).startswith("aoti_") and "AOTI" not in line and "=" not in line.split("(", 1)[0] \
                and _only_data_pointers(line, names):
            continue
        return None
    return names


def _pool_region(lines: list[str], start: int, end: int, budget: int) -> tuple[list[str], dict[int, str], int]:
    """The outermost loop ``lines[start:end + 1]`` of the function ``lines``: (declarations to put before it, the
    rewritten lines by index, the number of handles changed: buffers pooled, inputs taken by reference)."""
    region = lines[start + 1:end]
    arrays = {}  # the function's constant arrays (Inductor numbers them once per function)
    for line in lines:
        m = _ARRAY.match(line)
        if m:
            arrays[m.group(1) or m.group(3)] = (line.strip(), m.group(2))
    allocations = [m.group(6) for line in region for m in [_ALLOC.match(line)] if m]
    pre, new, used, changed = [], {}, 0, 0
    for i, line in enumerate(region):
        m = _ALLOC.match(line)
        if not m:
            continue
        indent, ndim, sizes, strides, dtype, name = m.groups()
        handle_decl = f"{indent}AtenTensorHandle {name}_handle;"
        if i == 0 or region[i - 1] != handle_decl or allocations.count(name) != 1:
            continue
        if sizes not in arrays or strides not in arrays:
            continue  # sizes or strides not compile-time constants (symbolic sizes): left as it is
        size_text = arrays[sizes][1]
        try:
            elements = math.prod(int(v.strip().rstrip("L")) for v in (size_text or "").split(",") if v.strip())
        except ValueError:
            continue
        nbytes = elements * _DTYPE_BYTES.get(dtype.removeprefix("cached_torch_dtype_"), 16)
        if used + nbytes > budget or _group(name, region) is None:
            continue
        for a in (sizes, strides):
            if arrays[a][0] not in pre:
                pre.append(arrays[a][0])
        raii = f"{indent}RAIIAtenTensorHandle {name}({name}_handle);"
        if i + 1 >= len(region) or region[i + 1] != raii:
            continue
        pool = f"{name}_pool"
        pre.append(f"AtenTensorHandle {pool}_handle;")
        pre.append(f"AOTI_TORCH_ERROR_CODE_CHECK(aoti_torch_empty_strided({ndim}, {sizes}, {strides}, {dtype}, "
                   f"cached_torch_device_type_cpu, 0, &{pool}_handle));")
        pre.append(f"RAIIAtenTensorHandle {pool}({pool}_handle);")
        edits = {i - 1: "", i: f"{indent}auto& {name} = {pool};", i + 1: "", **_references(name, region)}
        new.update({start + 1 + j: text for j, text in edits.items()})
        used += nbytes
        changed += 1
    # Handles made at each iteration for the inputs of a loop's condition and body (copies of handles made before the
    # loop) become references to those where the code keeps them inside the iteration.
    for i in range(len(region) - 2):
        m = _INPUT.match(region[i + 1])
        if not m:
            continue
        indent, outer, inner = m.groups()
        if (region[i] != f"{indent}AtenTensorHandle {inner}_handle;"
                or region[i + 2] != f"{indent}RAIIAtenTensorHandle {inner}({inner}_handle);"
                or any(start + 1 + j in new for j in (i, i + 1, i + 2)) or _group(inner, region) is None):
            continue
        edits = {i: "", i + 1: f"{indent}auto& {inner} = {outer};", i + 2: "", **_references(inner, region)}
        new.update({start + 1 + j: text for j, text in edits.items()})
        changed += 1
    rec_pre, rec_new = _recycle_carried(region, {j - start - 1 for j in new})
    pre += rec_pre
    new.update({start + 1 + j: text for j, text in rec_new.items()})
    return pre, new, changed + len(rec_pre) // 2


def _recycle_carried(region: list[str], edited: set[int]) -> tuple[list[str], dict[int, str]]:
    """The loop's carried values (the condition's result, the body's outputs: handles declared before the loop and
    given a new buffer at the end of each iteration, ``C.reset(); C = std::move(N);``, ``N`` a buffer allocated in the
    iteration) recycled: the buffer ``C`` held during an iteration (which that iteration's code only read) becomes the
    next allocation of ``N``'s buffer instead of being freed, so that from the third iteration on no carried value is
    allocated (two buffers per carried value alternate). Only where every value the loop carries out of an iteration
    is such a fresh buffer (no carried value is a view of another, or of an input), ``N`` and the names moved from it
    (``// reuse``) are used only by kernels' data pointers and that one move, and ``C`` only by references taken on
    it (``auto& X = C;``) and reads; the first iteration's ``C`` (the loop's initial value, which may share storage
    with other buffers) is freed as before. Returns (declarations to put before the loop, rewritten lines by index);
    nothing where a condition fails. The kernels write every element of their outputs, so the values are those of a
    fresh buffer: bit-identical outputs."""
    declared = set()
    for line in region:
        if _LOCAL.match(line):
            declared.update(re.findall(r"(?:auto&? |RAIIAtenTensorHandle |AtenTensorHandle |bool )(" + _IDENT
                                       + r")\b", line))
        if "while (1)" in line:
            return [], {}  # a nested loop: left as it is
    moves = []  # (index of the reset line, carried name C, moved name N)
    for i, line in enumerate(region):
        m = _MOVE_OUT.match(line)
        if not m or m.group(2) in declared:
            continue
        indent, carried, moved = m.groups()
        if i == 0 or region[i - 1] != f"{indent}{carried}.reset();" or i in edited or i - 1 in edited:
            return [], {}  # an outer handle given a value otherwise: left as it is
        moves.append((i - 1, carried, moved))
    if not moves or len({c for _, c, _ in moves}) != len(moves):
        return [], {}
    plan = []
    for at, carried, moved in moves:
        # N back through the reuse moves to its allocation
        chain, name = {moved}, moved
        while True:
            src = [m.group(2) for line in region for m in [_REUSE.match(line)] if m and m.group(1) == name]
            if len(src) != 1:
                break
            name = src[0]
            chain.add(name)
        allocs = [i for i, line in enumerate(region) for m in [_ALLOC.match(line)] if m and m.group(6) == name]
        if len(allocs) != 1:
            return [], {}
        a = allocs[0]
        indent = _ALLOC.match(region[a]).group(1)
        if a == 0 or a + 1 >= len(region) or region[a - 1] != f"{indent}AtenTensorHandle {name}_handle;" \
                or region[a + 1] != f"{indent}RAIIAtenTensorHandle {name}({name}_handle);" \
                or {a - 1, a, a + 1} & edited:
            return [], {}
        for i, line in enumerate(region):  # the buffer's names: data pointers, reuse moves and the one move out only
            if i in (a - 1, a, a + 1, at, at + 1) or not any(_word(n).search(line) for n in chain):
                continue
            m = _REUSE.match(line)
            if m and m.group(2) in chain:
                continue
            m = _KERNEL.match(line)
            if m and not m.group(1).startswith("aoti_") and "AOTI" not in line \
                    and "=" not in line.split("(", 1)[0] and _only_data_pointers(line, chain):
                continue
            return [], {}
        for i, line in enumerate(region):  # the carried handle: references to it, reads of it
            if i in (at, at + 1) or not _word(carried).search(line):
                continue
            if re.match(r"^\s*auto& " + _IDENT + r" = " + re.escape(carried) + r";$", line):
                continue
            if re.match(r"^\s*AOTI_TORCH_ERROR_CODE_CHECK\(aoti_torch_(?:item_bool|assign_tensors_out)\("
                        + re.escape(carried) + r", &" + _IDENT + r"\)\);$", line):
                continue  # a read, or a handle of the iteration's own on it (an input of the condition or body)
            m = _KERNEL.match(line)
            if m and not m.group(1).startswith("aoti_") and "AOTI" not in line \
                    and "=" not in line.split("(", 1)[0] and _only_data_pointers(line, {carried}):
                continue
            return [], {}
        plan.append((at, carried, name, a, indent))
    pre, new = [], {}
    for at, carried, name, a, indent in plan:
        spare, flag = f"{name}_spare", f"{carried}_recycle"
        pre += [f"RAIIAtenTensorHandle {spare};", f"bool {flag} = false;"]
        new[a] = (f"{indent}if ({spare}.get() != nullptr) {{ {name}_handle = {spare}.release(); }} else {{ "
                  + region[a].strip() + " }")
        ci = region[at][:len(region[at]) - len(region[at].lstrip())]
        new[at] = (f"{ci}if ({flag}) {{ {spare} = std::move({carried}); }} else {{ {carried}.reset(); }} "
                   f"{flag} = true;")
    return pre, new


def _text(line: object) -> str:
    """The code of one line of Inductor's wrapper buffer: a string; a deferred line's text (kept, for this analysis,
    even where Inductor drops it later); nothing for a line-number marker."""
    if isinstance(line, str):
        return line
    text = getattr(line, "line", None)
    return text if isinstance(text, str) else ""


def pool_loop_buffers(lines: list, budget: int = LOOP_POOL_BYTES) -> tuple[list, int]:
    """The lines of a C++ wrapper function (strings, and Inductor's deferred lines and line markers) with the scratch
    buffers of each outermost ``while (1)`` loop allocated once before it and the handles of the loops' inputs taken
    by reference (see the module docstring), and how many handles changed. Loops whose braces do not balance, or
    whose rewrite would touch a line of another kind, are left unchanged."""
    texts = [_text(line) for line in lines]
    result, i, total = [], 0, 0
    while i < len(lines):
        if texts[i].strip() != "while (1) {" or not isinstance(lines[i], str):
            result.append(lines[i])
            i += 1
            continue
        end = _loop_end(texts, i)
        if end is None:
            return lines, 0
        pre, new, changed = _pool_region(texts, i, end, budget)
        edited = {}
        for j, text in new.items():
            if isinstance(lines[j], str):
                edited[j] = text
            elif callable(getattr(lines[j], "_new_line", None)) and _text(lines[j]):
                edited[j] = lines[j]._new_line(text)  # (a deferred line stays deferred)
            else:
                edited = None
                break
        if edited:
            indent = texts[i][:len(texts[i]) - len(texts[i].lstrip())]
            result.append(f"{indent}{{  // neurodyn: buffers of the loop below, allocated once")
            result.extend(f"{indent}{p}" for p in pre)
            result.extend(edited.get(j, lines[j]) for j in range(i, end + 1))
            result.append(f"{indent}}}")
            total += changed
        else:
            result.extend(lines[i:end + 1])
        i = end + 1
    return result, total
