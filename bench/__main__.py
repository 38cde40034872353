"""`make bench`: every benchmark, each printing its ratios against its target."""
import argparse

from bench import checkpoints, ckpt_tools, ddp, generation, lora, throughput

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--only",
                    choices=("throughput", "generation", "checkpoints", "ckpt_tools", "lora",
                             "ddp"))
    args = ap.parse_args()
    if args.only in (None, "throughput"):
        throughput.main([])
        print()
    if args.only in (None, "generation"):
        generation.main([])
        print()
    if args.only in (None, "checkpoints"):
        checkpoints.main()
        print()
    if args.only in (None, "ckpt_tools"):
        ckpt_tools.main()
        print()
    if args.only in (None, "lora"):
        lora.main()
        print()
    if args.only in (None, "ddp"):
        ddp.main([])
