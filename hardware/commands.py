"""``ebm hardware ...``: the command line of the neuromorphic mapping (parse, call hardware's library, print).

    ebm hardware export   NET.h5 -o PROGRAM.h5 [--kind fixed|float] [--dt 1] [--steps 30] [--tol 1e-4]
    ebm hardware run      NET.h5|PROGRAM.h5 --dataset digits [--limit N] [--kind ...] [--resume-file F]
    ebm hardware estimate NET.h5|PROGRAM.h5 --dataset digits [--limit N] [--cost-table TABLE.json] [--json OUT]
    ebm hardware compare  NET.h5 --dataset digits [--student STUDENT.h5] [--limit N] [--json OUT] [--plot OUT.png]
    ebm hardware cost-table [-o TABLE.json]

Lava, torch and onnxruntime are imported only when a command runs. User errors raise ValueError or
FileNotFoundError, which ``ebm`` prints as ``ebm: error: ...`` with exit status 2; ``compare`` exits with 1 when a
target failed to run.
"""
from __future__ import annotations

from ebm_sim.outputs import add_output_argument
from ebm_sim.storage import write_json, write_text

from . import formats  # noqa: F401  (registers ebm-lava-program, which `ebm info` reads)


def _relaxation_options(args) -> dict:
    return {"dt": args.dt, "steps": args.steps, "tol": args.tol}


def cmd_export(args) -> int:
    from ebm_sim import storage
    from ebm_sim.deployment import Deployment

    from .lava_file import save_program
    from .mapping import to_program

    network = storage.load_dense_network(args.network, "the Lava mapping")
    options = {k: v for k, v in _relaxation_options(args).items() if v is not None}
    if args.kind == "fixed":
        options.update(frac_bits=args.frac_bits, max_weight_error=args.max_weight_error, max_zeroed=args.max_zeroed)
        options = {k: v for k, v in options.items() if v is not None}
    elif any(v is not None for v in (args.frac_bits, args.max_weight_error, args.max_zeroed)):
        raise ValueError("--frac-bits, --max-weight-error and --max-zeroed apply to --kind fixed only")
    program = to_program(network, args.kind, Deployment.of_network_file(args.network), **options)
    digest = save_program(args.output, program)
    sizes = "-".join(map(str, program.layer_sizes))
    print(f"wrote {args.output}: {program.kind} Lava program of {sizes} ({program.num_units} neurons, "
          f"{program.num_synapses} synapses in {len(program.connections())} Dense processes), dt {program.dt:g}, "
          f"{program.steps} steps per sample, tol {program.tol:g}, content hash {digest[:12]}")
    if program.kind == "fixed":
        errors = ", ".join(f"{e:.4f} ({100 * z:.1f}% zeroed)" for e, z in zip(
            program.notes["weight_relative_error"], program.notes["weights_rounded_to_zero"]))
        print(f"  8-bit weights, scales 2^-p with p = {list(program.weight_bits)}; weight exponents forward "
              f"{list(program.forward_exps)}, backward {list(program.backward_exps)}; states in units 2^-"
              f"{program.frac_bits} (limit {program.notes['frac_bits_limit']}, set by "
              f"{program.notes['frac_bits_limited_by']}); relative weight error per matrix {errors}")
    return 0


def cmd_run(args) -> int:
    from .evaluate import lava_report, load_test_inputs, program_from_file

    program, network = program_from_file(args.model, args.kind, **_relaxation_options(args))
    x, y = load_test_inputs(args.dataset, args.data_dir, args.limit, program.layer_sizes[0])
    r = lava_report(program, x, y, network, chunk=args.chunk, progress=not args.no_progress,
                    resume_file=args.resume_file)
    print(f"Lava {program.kind} ({'floating_pt' if program.kind == 'float' else 'fixed_pt'}) run of "
          f"{'-'.join(map(str, program.layer_sizes))} on {r['samples']} {args.dataset} test samples: accuracy "
          f"{100 * r['accuracy']:.2f}%, steps to equilibrium mean {r['steps_mean']:.1f} (converged "
          f"{100 * r['converged']:.1f}% within {program.steps}), {r['ms_per_step']:.3f} ms per Lava step, "
          f"{r['ms_per_sample']:.1f} ms per sample (compile and start-up {r['setup_s']:.1f} s)")
    s = r["simulator"]
    print(f"  vs the numpy simulator of the program: same prediction {100 * s['agreement']:.2f}%, same steps "
          f"{100 * s['same_steps']:.2f}%, max |output difference| {s['max_output_difference']:.3g}")
    if "numba" in r:
        n = r["numba"]
        print(f"  vs {n.get('engine', 'Numba')} {n['method']}: same prediction {100 * n['agreement']:.2f}%, same steps "
              f"{100 * n['same_steps']:.2f}%, Numba accuracy {100 * n['accuracy']:.2f}%")
    if args.json:
        write_json(args.json, r)
        print(f"wrote {args.json}")
    return 0


def _cost_table(path):
    from .cost_model import LOIHI, CostTable

    return CostTable.from_json(path) if path else LOIHI


def cmd_estimate(args) -> int:
    from .evaluate import estimate_report, load_test_inputs, program_from_file

    table = _cost_table(args.cost_table)
    program, _ = program_from_file(args.model, args.kind, **_relaxation_options(args))
    x, y = load_test_inputs(args.dataset, args.data_dir, args.limit, program.layer_sizes[0])
    r = estimate_report(program, x, y, table)
    print(f"{program.kind} program of {'-'.join(map(str, program.layer_sizes))} on {r['samples']} {args.dataset} "
          f"test samples (accuracy {100 * r['accuracy']:.2f}%); placement: cores per layer {r['placement']['cores']}, "
          f"neurons per core {r['placement']['neurons_per_core']}")
    print(r["summary"])
    if args.json:
        write_json(args.json, r)
        print(f"wrote {args.json}")
    return 0


def cmd_compare(args) -> int:
    from .targets import CompareSpec, compare, format_table, plot_bars

    spec = CompareSpec(network=args.network, dataset=args.dataset, data_dir=args.data_dir, limit=args.limit,
                       student=args.student, batch=args.batch, latency_samples=args.latency_samples,
                       repeats=args.repeats, lava_limit=args.lava_limit, cost_table=args.cost_table,
                       **{k: v for k, v in _relaxation_options(args).items() if v is not None})
    result = compare(spec, targets=args.targets, progress=not args.no_progress)
    print(format_table(result))
    if args.json:
        write_json(args.json, result)
        print(f"wrote {args.json}")
    if args.plot:
        plot_bars(result, args.plot)
        print(f"wrote {args.plot}")
    if result["failed"]:
        print(f"failed targets: {', '.join(result['failed'])}")
        return 1
    return 0


def cmd_cost_table(args) -> int:
    from .cost_model import LOIHI, estimate_label

    text = LOIHI.to_json()
    if args.output:
        write_text(args.output, text + "\n")
        print(f"wrote {args.output}: the default cost table ({estimate_label(LOIHI)}); edit it and pass it with "
              f"--cost-table")
    else:
        print(text)
    return 0


# ---------------------------------------------------------------------------------------------- parsers
def _targets(text: str) -> list:
    from .targets import TARGETS

    names = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in names if t not in TARGETS]
    if unknown or not names:
        import argparse
        raise argparse.ArgumentTypeError(f"unknown target(s) {', '.join(unknown) or '(none)'}; choose from "
                                         f"{', '.join(TARGETS)}")
    return names


def _data_arguments(p) -> None:
    p.add_argument("--dataset", required=True, metavar="NAME", help="digits, fashion-mnist, mnist, ...")
    p.add_argument("--data-dir", metavar="DIR", default=None, help="folder with the dataset files")
    p.add_argument("--limit", type=int, default=None, metavar="N",
                   help="a seeded, class-stratified subsample of N test images (default: the whole test split)")


def _relaxation_arguments(p) -> None:
    p.add_argument("--dt", type=float, default=None,
                   help="Euler step (default: the network's stored deployment, else 1: the fixed_point iteration)")
    p.add_argument("--steps", type=int, default=None,
                   help="steps per sample (default: the deployment's step cap, else 30)")
    p.add_argument("--tol", type=float, default=None,
                   help="equilibrium tolerance (default: the deployment's, else 1e-4)")


def add_parsers(sub) -> None:
    """Register ``ebm hardware`` and its subcommands on the ``ebm`` subparsers ``sub``."""
    hw = sub.add_parser("hardware", help="map a network onto Lava (float, fixed point), estimate Loihi cost, "
                                         "compare latency and energy across targets",
                        description="Neuromorphic mapping: Lava 0.10 processes (float and bit-accurate fixed "
                                    "point), a Loihi cost model (ESTIMATES from Davies et al. 2018, Table 2), and "
                                    "latency and energy across hardware targets.")
    commands = hw.add_subparsers(dest="hardware_command", metavar="SUBCOMMAND", required=True)

    p = commands.add_parser("export", help="write a network as a Lava program file (integers, exponents, topology)",
                            description="Map a network onto the Lava graph and write it as an ebm-lava-program HDF5 "
                                        "file that a Lava host loads with h5py alone (hardware/lava_file.py).")
    p.add_argument("network", metavar="NET.h5", help="the network file to map (ebm train, ebm init)")
    p.add_argument("--kind", choices=("fixed", "float"), default="fixed",
                   help="fixed: 8-bit weights, integer states (default); float: float64")
    _relaxation_arguments(p)
    p.add_argument("--frac-bits", type=int, default=None,
                   help="state fraction bits q (default: the largest safe value, at most 16)")
    p.add_argument("--max-weight-error", type=float, default=None,
                   help="refuse a matrix whose relative 8-bit quantization error exceeds this (default 0.1)")
    p.add_argument("--max-zeroed", type=float, default=None,
                   help="refuse a matrix with more than this share of its nonzero weights rounded to 0 (default 0.5)")
    add_output_argument(p, "-o", "--output", required=True, metavar="PROGRAM.h5", help="Lava program file to write")
    p.set_defaults(func=cmd_export)

    p = commands.add_parser("run", help="run test images through the Lava graph (Lava's CPU simulation)",
                            description="Run a dataset through the Lava graph sample by sample and report accuracy, "
                                        "steps to equilibrium, time per Lava step, and agreement with the numpy "
                                        "simulator of the program and (for a network file) with Numba.")
    p.add_argument("model", metavar="NET.h5|PROGRAM.h5", help="a network file, or a file of ebm hardware export")
    _data_arguments(p)
    p.add_argument("--kind", choices=("fixed", "float"), default=None, help="for a network file (default fixed)")
    _relaxation_arguments(p)
    p.add_argument("--chunk", type=int, default=64, help="samples between reads of the records (default 64)")
    add_output_argument(p, "--resume-file", policy="state", metavar="FILE.npz", default=None,
                        help="save finished samples here; rerunning the same command continues from it")
    add_output_argument(p, "--json", metavar="OUT.json", default=None, help="also write the report as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_run)

    p = commands.add_parser("estimate", help="Loihi energy and latency ESTIMATE per inference (cost model)",
                            description="Count synaptic ops, neuron updates, messages and timesteps to equilibrium "
                                        "of the fixed-point program on test images, and turn them into energy and "
                                        "latency ESTIMATES with a cited, replaceable per-operation cost table.")
    p.add_argument("model", metavar="NET.h5|PROGRAM.h5", help="a network file, or a file of ebm hardware export")
    _data_arguments(p)
    p.add_argument("--kind", choices=("fixed", "float"), default=None, help="for a network file (default fixed)")
    _relaxation_arguments(p)
    p.add_argument("--cost-table", metavar="TABLE.json", default=None,
                   help="per-operation costs (default: Loihi, Davies et al. 2018; ebm hardware cost-table prints it)")
    add_output_argument(p, "--json", metavar="OUT.json", default=None, help="also write the estimate as JSON")
    p.set_defaults(func=cmd_estimate)

    p = commands.add_parser("compare", help="latency, throughput, accuracy and energy across hardware targets",
                            description="Measure, on the same test images, the EBM (Numba, torch CPU/CUDA), its "
                                        "distilled student (torch, onnxruntime; CPU/CUDA), the Lava simulation "
                                        "(float, fixed point) and the Loihi estimate, each in its own process; print "
                                        "a table and optionally write JSON and a PNG bar chart.")
    p.add_argument("network", metavar="NET.h5", help="the EBM's network file")
    _data_arguments(p)
    p.add_argument("--student", metavar="STUDENT.h5", default=None, help="its distilled student (ebm distill)")
    p.add_argument("--lava-limit", type=int, default=None, metavar="N",
                   help="Lava runs only the first N of the samples (about 20-50 ms each); default all")
    p.add_argument("--batch", type=int, default=256, help="batch of the throughput timing (default 256)")
    p.add_argument("--latency-samples", type=int, default=100,
                   help="single-sample calls timed for the latency (default 100)")
    p.add_argument("--repeats", type=int, default=5, help="repeats of the batch timing (default 5)")
    p.add_argument("--targets", type=_targets, default=None, metavar="A,B,...", help="a subset of the targets")
    _relaxation_arguments(p)
    p.add_argument("--cost-table", metavar="TABLE.json", default=None,
                   help="per-operation costs of the Loihi estimate (default: Davies et al. 2018)")
    add_output_argument(p, "--json", metavar="OUT.json", default=None, help="also write the comparison as JSON")
    add_output_argument(p, "--plot", metavar="OUT.png", default=None, help="bar chart (log scales)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_compare)

    p = commands.add_parser("cost-table", help="print or write the default (Loihi) cost table as JSON",
                            description="The per-operation cost table the estimates use, as JSON: edit a copy and "
                                        "pass it with --cost-table.")
    add_output_argument(p, "-o", "--output", metavar="TABLE.json", default=None,
                        help="write the table to this file (default: print it)")
    p.set_defaults(func=cmd_cost_table)
