"""Build the adaptation results table (logic in ``lssa_hf.finetune.table``): trains the LoRA rows
that are not cached yet, evaluates every row at every length, writes table.md / table.json.

    python recipes/adapt/run_table.py --config recipes/adapt/configs/table-smollm2.yaml
    python recipes/adapt/run_table.py --config ... --rows "softmax + LoRA" "LSSAR p=15 + LoRA"
    python recipes/adapt/run_table.py --config ... --cached     # print what is measured so far
"""

import argparse

from lssa_hf.finetune.table import TableConfig, run_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="table YAML (fields of lssa_hf.finetune.table.TableConfig)")
    parser.add_argument("--rows", nargs="+", help="only these rows (by name)")
    parser.add_argument("--lengths", type=int, nargs="+", help="override the context lengths")
    parser.add_argument("--output-dir", help="override the output folder")
    parser.add_argument("--name", default="table", help="file name of the written table (<name>.md, <name>.json)")
    parser.add_argument("--cached", action="store_true",
                        help="only print the cells cached so far: train and measure nothing, write nothing")
    args = parser.parse_args()
    table = TableConfig.from_yaml(args.config, lengths=args.lengths, output_dir=args.output_dir)
    print(run_table(table, args.rows, args.name, measure=not args.cached))


if __name__ == "__main__":
    main()
