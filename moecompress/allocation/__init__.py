"""Mixed-precision bit allocation per expert by 0/1 integer programming (MC-MoE's PMQ, done in real bytes).

Pipeline use (shapes first, errors before any quantization):

    cfg = AllocationConfig(candidates=(2, 3, 4), budget_bits=2.75)
    pricing = price_candidates(cfg.candidates, expert_shapes(H, I), L, E)   # bytes (L, E, C)
    prob = build_problem(cfg, zero_costs, pricing)     # raises if the budget is infeasible
    ... calibrate; eps[l, e, c] = expert_output_error(X, g, (Wg, Wu, Wd), quantize_c) ...
    costs = expert_costs(eps, counts, gate_mass, cfg.alpha, cfg.beta, cfg.importance_floor)
    alloc = allocate(cfg, costs.cost, pricing)          # Allocation; alloc.spec(l, e) -> QuantSpec
    print(allocation_table(alloc))

Modules: config (AllocationConfig), pricing (nbytes prices, budget), importance (eps and costs),
problem (arrays + feasibility), lp (the program, CBC), baselines (uniform, random), result (Allocation).
"""
from .baselines import random_allocation, uniform_allocation
from .config import AllocationConfig
from .importance import Costs, expert_costs, expert_output_error
from .lp import allocate, solve_allocation
from .pricing import Pricing, budget_bytes, expert_shapes, overhead_bits, price_candidates, stored_bits
from .problem import AllocationProblem, build_problem, check_feasible
from .result import Allocation, allocation_table

__all__ = ["AllocationConfig", "Allocation", "AllocationProblem", "Costs", "Pricing", "allocate",
           "allocation_table", "budget_bytes", "build_problem", "check_feasible", "expert_costs",
           "expert_output_error", "expert_shapes", "overhead_bits", "price_candidates", "random_allocation",
           "solve_allocation", "stored_bits", "uniform_allocation"]
