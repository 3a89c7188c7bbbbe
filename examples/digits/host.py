"""Host the digits classifier on a running nimble-edge server.

    export NIMBLE_EDGE_ADMIN_TOKEN=...   # the token the server was started with
    python examples/digits/host.py --address 127.0.0.1:7000

Then start devices with ``device.py``, and fetch the result with
``python examples/digits/host.py --address 127.0.0.1:7000 --retrieve``.
"""

from __future__ import annotations

import argparse

import digits

from plan_runtime import ModelCentricFLClient


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--address", default="127.0.0.1:7000")
    parser.add_argument("--cycles", type=int, default=30)
    parser.add_argument(
        "--max-diffs",
        type=int,
        default=4,
        help="diffs per cycle; as many workers are admitted, so that no "
        "device trains for a cycle that closes before it reports",
    )
    parser.add_argument(
        "--cycle-length",
        type=float,
        default=60,
        help="seconds a cycle stays open: with fewer devices than --max-diffs "
        "it closes then, on the diffs it has",
    )
    parser.add_argument(
        "--retrieve",
        action="store_true",
        help="print the latest checkpoint's test accuracy instead",
    )
    args = parser.parse_args()

    # The admin token comes from NIMBLE_EDGE_ADMIN_TOKEN; pass token=... to
    # give it explicitly.
    client = ModelCentricFLClient(address=args.address, secure=False)
    client.connect()

    if args.retrieve:
        _, _, test_x, test_y = digits.load_split()
        state = client.retrieve_model(digits.NAME, digits.VERSION, checkpoint="latest")
        print(f"test accuracy: {digits.test_accuracy(state, test_x, test_y):.3f}")
        return

    model = digits.build_model()
    training_plan = digits.make_training_plan(model)
    print(f"traced {training_plan}")
    answer = client.host_federated_training(
        model=model,
        client_plans={"training_plan": training_plan},
        client_protocols={},
        server_averaging_plan=None,
        client_config=digits.CLIENT_CONFIG,
        server_config={
            "num_cycles": args.cycles,
            "cycle_length": args.cycle_length,
            "max_diffs": args.max_diffs,
            "max_workers": args.max_diffs,
            # A device that took an assignment and vanished gives its slot
            # back after this long, so it cannot hold a cycle open.
            "assignment_timeout": 30,
            "minimum_upload_speed": 0,
            "minimum_download_speed": 0,
        },
    )
    print(f"hosted {digits.NAME}@{digits.VERSION}: {answer}")


if __name__ == "__main__":
    main()
