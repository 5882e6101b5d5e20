"""Request: one generation request's lifetime in the engine (its config, its slot, its host-side counters, its
events and its answer)."""
from __future__ import annotations

import dataclasses
import itertools

from .generation_config import GenerationConfig
from .modes import phase_of

_ids = itertools.count()


@dataclasses.dataclass
class StepEvent:
    """What one engine step did to one request. positions/tokens/canvas are filled only for requests added with
    events=True (answer positions: 0 is the first generated token)."""
    request: "Request"
    nfe: int                          # the request's forward passes so far
    refresh: bool                     # this forward ran over the whole canvas (every forward in exact mode)
    done: bool
    positions: list[int] | None = None  # answer positions committed by this step
    tokens: list[int] | None = None     # the token ids committed there
    canvas: list[int] | None = None     # the whole answer after the step, masks included


@dataclasses.dataclass(eq=False)
class Request:
    """A handle on one request: added by Engine.add, advanced by Engine.step, ended by completion or Engine.cancel."""
    prompt: list[int]
    config: GenerationConfig
    events: bool = False
    id: int = dataclasses.field(default_factory=lambda: next(_ids))
    slot: int = -1
    block: int = 0                    # current block
    step_in_block: int = 0            # steps done in the current block
    nfe: int = 0                      # forward passes (= denoising steps) so far
    refreshes: int = 0                # of which over the whole canvas
    done: bool = False
    cancelled: bool = False
    stopped_early: bool = False       # early_stop ended it before its last block
    answer: list[int] | None = None   # the answer canvas (gen_length ids) once done
    filled: int = 0                   # masked positions written with EOS by early stop (not committed by a step)
    pending: list[StepEvent] = dataclasses.field(default_factory=list)   # events not yet taken by the caller
    last: list[int] | None = None     # the answer as the last event saw it (events=True)

    @property
    def prompt_len(self) -> int:
        return len(self.prompt)

    @property
    def length(self) -> int:
        """Canvas columns: prompt + gen_length."""
        return len(self.prompt) + self.config.gen_length

    @property
    def block_start(self) -> int:
        """Canvas column of the current block."""
        return len(self.prompt) + self.block * self.config.block_length

    @property
    def phase(self) -> str:
        return phase_of(self.config.mode, self.step_in_block)

    @property
    def predictable(self) -> bool:
        """Its counters follow from the step count alone (fixed schedule, no early stop): the host need not read the
        device to know its block and phase."""
        return not self.config.parallel and not self.config.early_stop

    def take_events(self) -> list[StepEvent]:
        ev, self.pending = self.pending, []
        return ev
