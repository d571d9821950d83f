"""Every rule about turns, in one place.

The stages detect and produce (speech, words, tokens, audio); the
:class:`TurnController` alone decides what that means for the conversation:
when a turn ends (endpointing), when a reply may start early and when it is
thrown away, when a reply may play (hold, supersede), when the user has
interrupted it (barge-in), what a budget overrun does, and what goes into
the conversation history. See docs/architecture.md for the flow.
"""

from .controller import Stages, TurnController, TurnSettings
from .endpointing import EndpointRule
from .floor import Floor
from .history import Conversation

__all__ = ["Conversation", "EndpointRule", "Floor", "Stages", "TurnController", "TurnSettings"]
