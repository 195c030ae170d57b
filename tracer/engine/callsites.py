"""Stacks to call sites: the one place a captured stack is symbolized and the frame its
figures belong to is chosen.

Allocation sites, memory-syscall, fault and lock-wait sites and handle creations all
come through here, so a better unwinder or a new charging rule changes every table at
once instead of three of them drifting apart.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import replace

from tracer.model.callsite import CallSite
from tracer.model.frames import Frame
from tracer.probes.alloc import stack_error_name
from tracer.symbols.attribution import RUNTIME_MODULES, first_frame_outside
from tracer.symbols.callee import CalleeResolver
from tracer.symbols.symbolizer import ANON_MODULE, JIT_MODULE, Symbolizer
from tracer.symbols.unwind import ReturnChecker

#: Picks the index of the charged frame in a symbolized stack (innermost first).
ChargeRule = Callable[[Sequence[Frame]], int]
#: Returns the raw addresses (innermost first) of a stack id.
StackReader = Callable[[int], tuple[int, ...]]


class CallSites:
    """Symbolized, charged stacks of one address space, memoized per stack map, stack id
    and rule: the alloc, triage and handle probe sets number their stacks each in their
    own map, so the same id in two of them is two stacks."""

    def __init__(self, symbolizer: Symbolizer) -> None:
        self.symbolizer = symbolizer
        self.callees = CalleeResolver(symbolizer)
        self.returns = ReturnChecker(symbolizer.maps)
        self._memo: dict[tuple[StackReader, int, frozenset[str], bool, bool], CallSite] = {}
        #: final ones, by (stack, exact_pc): see frames()
        self._frames: dict[tuple[tuple[int, ...], bool], list[Frame]] = {}
        self.unnamed_jit: set[int] = set()  # return addresses stacks were cut at

    def frames(self, stack: tuple[int, ...], exact_pc: bool = False) -> list[Frame]:
        """The stack's frames, up to the first that is no return address, or that is in
        anonymous memory no perf map names: executable, so JIT code, but a return
        address is code only where something says which (issue 16); the cut addresses
        are kept for the report's note (`jit_note`). Frame 0, the pc (a fault's, a
        syscall's), is an instruction the CPU ran: in anonymous memory, unnamed JIT code,
        even where the maps read later say rw- (V8 flips its code pages, W^X).
        `exact_pc`: frame 0 is the instruction itself (a page fault's), named as it is,
        not as the call before a return address (an instruction fetch faults at a
        function's first byte, which the byte before would name as the function before).
        Memoized once final (every frame named or in a file): each snapshot charges
        every stack id again, and node's thousands of them cost a recording ~0.5 s
        a second in symbolizing alone."""
        got = self._frames.get((stack, exact_pc))
        if got is not None:
            return list(got)
        true = self.returns.true_frames(stack)
        if exact_pc and true:
            frames = [*self.symbolizer.chain(true[0], False), *self.symbolizer.frames(true[1:])]
        else:
            frames = self.symbolizer.frames(true)
        if frames and frames[0].module == ANON_MODULE:
            frames[0] = replace(frames[0], module=JIT_MODULE, module_class="js")
        for i in range(1, len(frames)):
            if frames[i].module == ANON_MODULE:
                self.unnamed_jit.add(frames[i].address)
                return frames[:i]  # a perf map may name the rest later
        if all(f.symbol is not None or (f.module or "").startswith("/") for f in frames):
            self._frames[stack, exact_pc] = list(frames)
        return frames

    def charged(self, stack: tuple[int, ...], rule: ChargeRule,
                exact_pc: bool = False) -> tuple[list[Frame], int]:
        """The stack's `frames` and the index `rule` charges (0 for an empty stack)."""
        frames = self.frames(stack, exact_pc)
        return frames, (max(rule(frames), 0) if frames else 0)

    def call_site(self, stack_id: int, stack_of: StackReader,
                  inside: Collection[str] = RUNTIME_MODULES,
                  name_callee: bool = False, exact_pc: bool = False) -> CallSite:
        """The site of a stack id, charged to its first frame outside the module
        classes `inside`; with `name_callee`, `via` is read from that frame's own call
        instruction (libraries tail-call static helpers that leave no named frame).
        `stack_of` stands for its stack map in the memo: a probe set's bound `stack`
        method (equal for the same probe set, distinct for two)."""
        key = (stack_of, stack_id, frozenset(inside), name_callee, exact_pc)
        got = self._memo.get(key)
        if got is None:
            got = self._memo[key] = self._build(stack_id, stack_of, inside, name_callee,
                                                exact_pc)
        return got

    def _build(self, stack_id: int, stack_of: StackReader, inside: Collection[str],
               name_callee: bool, exact_pc: bool) -> CallSite:
        if stack_id < 0:
            return CallSite(lost_stack=stack_error_name(stack_id))
        frames, charge = self.charged(stack_of(stack_id),
                                      lambda f: first_frame_outside(f, inside), exact_pc)
        if not frames:
            return CallSite(lost_stack="empty stack")
        callee = self.callees.callee(frames[charge].address) if name_callee else None
        return CallSite(frames, charge, callee=callee)
