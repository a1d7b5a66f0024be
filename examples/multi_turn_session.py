"""A multi-turn conversation that keeps its prefix warm: turn N never re-prefills turns 1..N-1.

    python examples/multi_turn_session.py [CHECKPOINT]
"""

import sys

import anyio

from mach_runtime import Runtime

TURNS = ["Write a function that reverses a list.", "Now make it work for strings too.", "Add a docstring."]


async def main(checkpoint=None):
    async with Runtime.open(checkpoint) as rt:
        async with rt.session(system="You are a concise Python assistant.") as session:
            for user in TURNS:
                print(f"\n>>> {user}\n", flush=True)
                async for chunk in session.send(user, max_tokens=48):
                    print(chunk.text, end="", flush=True)
                u = session.turns[-1].usage
                print(f"\n[prompt {u['prompt_tokens']} tokens: {u['cached_tokens']} reused from earlier turns, "
                      f"{u['prefilled_tokens']} prefilled]")


if __name__ == "__main__":
    anyio.run(main, *(sys.argv[1:2]))
