"""Build the adaptation results table (logic in ``lssa_hf.finetune.table``): trains the LoRA rows
that are not cached yet, evaluates every row at every length, writes table.md / table.json.

    python recipes/adapt/run_table.py --config recipes/adapt/configs/table-smollm2.yaml
    python recipes/adapt/run_table.py --config ... --rows "softmax + LoRA" "LSSAR p=15 + LoRA"
    python recipes/adapt/run_table.py --config ... --cached     # print what is measured so far
    python recipes/adapt/run_table.py --config ... --summary 512 8192 16384 32768  # README view + gaps
"""

import argparse

from lssa_hf.finetune.summary import gaps, gaps_by_budget, headline
from lssa_hf.finetune.table import TableConfig, cached_results, run_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="table YAML (fields of lssa_hf.finetune.table.TableConfig)")
    parser.add_argument("--rows", nargs="+", help="only these rows (by name)")
    parser.add_argument("--lengths", type=int, nargs="+", help="override the context lengths")
    parser.add_argument("--output-dir", help="override the output folder")
    parser.add_argument("--name", default="table", help="file name of the written table (<name>.md, <name>.json)")
    parser.add_argument("--cached", action="store_true",
                        help="only print the cells cached so far: train and measure nothing, write nothing")
    parser.add_argument("--summary", type=int, nargs="+", metavar="LENGTH",
                        help="print the cached cells at these lengths only, best in bold, then the gap between "
                             "the best LSSA/LSSAR row and the best softmax row per column, overall and at each "
                             "training budget (measures nothing)")
    args = parser.parse_args()
    table = TableConfig.from_yaml(args.config, lengths=args.lengths, output_dir=args.output_dir)
    if args.summary:
        results = cached_results(table, args.rows)
        print("\n\n".join(view(results, args.summary) for view in (headline, gaps, gaps_by_budget)))
        return
    print(run_table(table, args.rows, args.name, measure=not args.cached))


if __name__ == "__main__":
    main()
