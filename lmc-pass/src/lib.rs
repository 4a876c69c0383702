//! The LLVM pass behind `cowcc` (LMC: compiler-instrumented checkpoints).
//!
//! Before every store, atomic read-modify-write, cmpxchg and `llvm.memcpy`/`llvm.memmove`/
//! `llvm.memset` whose destination is not provably in the function's own stack frame (an
//! `alloca`, through casts and GEPs), it inserts a call to `__cow_lmc_check_inline(dst, len)`,
//! a function the pass defines in the module as `alwaysinline`: it compares the region's
//! shadow tag with the current generation (loads and a compare, inlined) and calls libcow's
//! `__cow_lmc_write` (through a `preserve_most` trampoline) only on the first write of a 128-byte region in a generation, or when the
//! write spans two regions. This runs at the start of the pipeline, so the inliner (or the
//! always-inliner at `-O0`) folds the check into the code and the optimizer sees it. Every
//! instrumented write carries `!cow.lmc` metadata; at the end of the pipeline the pass runs
//! again and instruments what has none — writes the optimizer created (library-call
//! simplification turns a `strcpy` of a known string into stores) — with a call to libcow's
//! out-of-line `__cow_lmc_check`. Small constant `memcpy`s are turned into the load and store
//! instcombine would make of them before the instrumentation, so that it sees them.
//!
//! It also puts safe points at loop back-edges and function entries: a read of a page libcow
//! makes inaccessible to ask for a checkpoint ([`insert_safe_points`]).
//!
//! Each instrumented module also adds an `.init_array` entry registering its poll page with
//! `__cow_lmc_register`, so that `cow_init("lmc")` can tell an instrumented program from one
//! that is not ([`register_module`]).

use llvm_plugin::inkwell::attributes::{Attribute, AttributeLoc};
use llvm_plugin::inkwell::basic_block::BasicBlock;
use llvm_plugin::inkwell::builder::Builder;
use llvm_plugin::inkwell::context::ContextRef;
use llvm_plugin::inkwell::module::{Linkage, Module};
use llvm_plugin::inkwell::targets::TargetData;
use llvm_plugin::inkwell::values::{
    AsValueRef, BasicValue, BasicValueEnum, FunctionValue, GlobalValue, InstructionOpcode,
    InstructionValue, IntValue, PointerValue,
};
use llvm_plugin::inkwell::{AddressSpace, AtomicOrdering, GlobalVisibility, IntPredicate};
use llvm_plugin::{
    LlvmModulePass, ModuleAnalysisManager, PassBuilder, PipelineParsing, PreservedAnalyses,
};
use std::collections::{HashMap, HashSet};

/// log2 of the region size; `cow::backend::lmc::REGION_SHIFT`, from the same build-time
/// variable.
const REGION_SHIFT: u64 = match option_env!("COW_LMC_REGION_SHIFT") {
    Some(n) => region_shift(n),
    None => 7,
};

/// `COW_LMC_REGION_SHIFT`'s value, checked at compile time (6 to 12).
const fn region_shift(n: &str) -> u64 {
    let b = n.as_bytes();
    let mut v = 0u64;
    let mut i = 0;
    while i < b.len() {
        assert!(
            b[i].is_ascii_digit(),
            "COW_LMC_REGION_SHIFT: a number from 6 to 12"
        );
        v = v * 10 + (b[i] - b'0') as u64;
        i += 1;
    }
    assert!(
        v >= 6 && v <= 12,
        "COW_LMC_REGION_SHIFT: a number from 6 to 12"
    );
    v
}
/// The inlined check the pass defines in each module.
const CHECK: &str = "__cow_lmc_check_inline";

/// Metadata on every write the pass has instrumented.
const MARK: &str = "cow.lmc";
/// The out-of-line check (libcow) for writes found only at the end of the pipeline.
const CHECK_OUT_OF_LINE: &str = "__cow_lmc_check_pm";
/// The slow path of the inlined check (libcow's `__cow_lmc_write`, through its trampoline).
const SLOW_PATH: &str = "__cow_lmc_write_pm";
/// LLVM's `preserve_mostcc`.
const PRESERVE_MOST: u32 = 14;

#[llvm_plugin::plugin(name = "cow-lmc", version = "0.1")]
fn plugin_registrar(builder: &mut PassBuilder) {
    // `clang -fpass-plugin=…`: at the start of every pipeline (-O0 included), with the check
    // inlined afterwards; and at its end, for writes the optimizer created meanwhile (a
    // `strcpy` of a known string becomes a `memcpy`, then plain stores).
    builder.add_pipeline_start_ep_callback(|manager, _| {
        manager.add_pass(Instrument { last: false });
    });
    builder.add_optimizer_last_ep_callback(|manager, _| {
        manager.add_pass(Instrument { last: true });
    });
    // `opt -load-pass-plugin=… -passes=cow-lmc`.
    builder.add_module_pipeline_parsing_callback(|name, manager| {
        if name == "cow-lmc" {
            manager.add_pass(Instrument { last: false });
            manager.add_pass(Instrument { last: true });
            PipelineParsing::Parsed
        } else {
            PipelineParsing::NotParsed
        }
    });
}

/// The instrumentation pass: first (`last: false`) every write, with the inlined check;
/// then (`last: true`) the writes without the mark, with a call to libcow's check.
struct Instrument {
    last: bool,
}

/// A write to instrument: the instruction, its destination and its length in bytes.
struct Site<'ctx> {
    before: InstructionValue<'ctx>,
    dst: PointerValue<'ctx>,
    len: Len<'ctx>,
}

enum Len<'ctx> {
    Bytes(u64),
    Value(IntValue<'ctx>),
}

impl LlvmModulePass for Instrument {
    fn run_pass(&self, module: &mut Module, _: &ModuleAnalysisManager) -> PreservedAnalyses {
        if !self.last && module.get_function(CHECK).is_some() {
            return PreservedAnalyses::All; // instrumented already
        }
        let layout = module.get_data_layout();
        let Ok(layout) = layout.as_str().to_str() else {
            return PreservedAnalyses::All;
        };
        let td = TargetData::create(layout);
        let ctx = module.get_context();
        let mark = ctx.get_kind_id(MARK);
        if !self.last {
            lower_small_copies(module, &ctx);
        }
        let mut sites = Vec::new();
        for f in module.get_functions() {
            let name = f.get_name().to_bytes();
            if name == CHECK.as_bytes() || name == POLL.as_bytes() {
                continue;
            }
            for bb in f.get_basic_blocks() {
                let mut next = bb.get_first_instruction();
                while let Some(inst) = next {
                    if let Some(site) = site(&td, inst) {
                        let done = inst.get_metadata(mark).is_some();
                        if !done && !in_own_frame(site.dst) {
                            sites.push(site);
                        }
                    }
                    next = inst.get_next_instruction();
                }
            }
        }
        if self.last && sites.is_empty() {
            return PreservedAnalyses::All;
        }
        let check = if self.last {
            let void = ctx.void_type();
            let args = [
                ctx.ptr_type(AddressSpace::default()).into(),
                ctx.i64_type().into(),
            ];
            module.get_function(CHECK_OUT_OF_LINE).unwrap_or_else(|| {
                let f = module.add_function(CHECK_OUT_OF_LINE, void.fn_type(&args, false), None);
                f.set_call_conventions(PRESERVE_MOST);
                f
            })
        } else {
            register_module(module);
            define_check(module, &ctx)
        };
        if !self.last {
            insert_safe_points(module, &ctx);
        }
        let tag = ctx.metadata_node(&[]);
        let builder = ctx.create_builder();
        let i64t = ctx.i64_type();
        for s in &sites {
            builder.position_before(&s.before);
            let len = match s.len {
                Len::Bytes(n) => i64t.const_int(n, false),
                Len::Value(v) if v.get_type().get_bit_width() < 64 => builder
                    .build_int_z_extend(v, i64t, "cow.len")
                    .expect("zext"),
                Len::Value(v) => v,
            };
            let call = builder
                .build_call(check, &[s.dst.into(), len.into()], "")
                .expect("call");
            call.set_call_convention(check.get_call_conventions());
            let _ = s.before.set_metadata(tag, mark);
        }
        PreservedAnalyses::None
    }
}

/// An instruction operand, as inkwell hands it out.
type Operand<'a> = Option<either::Either<BasicValueEnum<'a>, BasicBlock<'a>>>;

fn pointer(v: Operand) -> Option<PointerValue> {
    match v? {
        either::Either::Left(BasicValueEnum::PointerValue(p)) => Some(p),
        _ => None,
    }
}

fn value(v: Operand) -> Option<BasicValueEnum> {
    match v? {
        either::Either::Left(b) => Some(b),
        _ => None,
    }
}

/// The write `inst` makes, if it is one the pass instruments.
fn site<'ctx>(td: &TargetData, inst: InstructionValue<'ctx>) -> Option<Site<'ctx>> {
    let size = |v: BasicValueEnum<'ctx>| Len::Bytes(td.get_store_size(&v.get_type()));
    match inst.get_opcode() {
        InstructionOpcode::Store => Some(Site {
            before: inst,
            dst: pointer(inst.get_operand(1))?,
            len: size(value(inst.get_operand(0))?),
        }),
        InstructionOpcode::AtomicRMW | InstructionOpcode::AtomicCmpXchg => Some(Site {
            before: inst,
            dst: pointer(inst.get_operand(0))?,
            len: size(value(inst.get_operand(1))?),
        }),
        InstructionOpcode::Call => {
            let callee = called(inst)?;
            let name = callee.get_name().to_bytes();
            let intrinsic = [&b"llvm.memcpy"[..], b"llvm.memmove", b"llvm.memset"]
                .iter()
                .any(|p| name.starts_with(p));
            if !intrinsic {
                return None;
            }
            let len = match value(inst.get_operand(2))? {
                BasicValueEnum::IntValue(v) => v,
                _ => return None,
            };
            Some(Site {
                before: inst,
                dst: pointer(inst.get_operand(0))?,
                len: match len.get_zero_extended_constant() {
                    Some(n) => Len::Bytes(n),
                    None => Len::Value(len),
                },
            })
        }
        _ => None,
    }
}

/// Replaces every `llvm.memcpy`/`llvm.memmove` of a constant 1, 2, 4 or 8 bytes (not volatile)
/// by a load and a store of one integer — what instcombine would do later, after the
/// instrumentation, creating a store without the pass's mark (then checked a second time, out
/// of line, at the end of the pipeline: a call for every `TValue` copy in Lua).
fn lower_small_copies(module: &Module, ctx: &ContextRef) {
    let align_kind = Attribute::get_named_enum_kind_id("align");
    let builder = ctx.create_builder();
    for f in module.get_functions() {
        for bb in f.get_basic_blocks() {
            let mut next = bb.get_first_instruction();
            while let Some(inst) = next {
                next = inst.get_next_instruction();
                let Some(callee) = called(inst) else {
                    continue;
                };
                let name = callee.get_name().to_bytes();
                if !(name.starts_with(b"llvm.memcpy.") || name.starts_with(b"llvm.memmove.")) {
                    continue;
                }
                let constant = |k| match value(inst.get_operand(k)) {
                    Some(BasicValueEnum::IntValue(v)) => v.get_zero_extended_constant(),
                    _ => None,
                };
                let (Some(len @ (1 | 2 | 4 | 8)), Some(0)) = (constant(2), constant(3)) else {
                    continue;
                };
                let (Some(dst), Some(src)) =
                    (pointer(inst.get_operand(0)), pointer(inst.get_operand(1)))
                else {
                    continue;
                };
                let Ok(call) = llvm_plugin::inkwell::values::CallSiteValue::try_from(inst) else {
                    continue;
                };
                let align = |k| {
                    call.get_enum_attribute(AttributeLoc::Param(k), align_kind)
                        .map_or(1, |a| a.get_enum_value() as u32)
                };
                let ty = ctx.custom_width_int_type(8 * len as u32);
                builder.position_before(&inst);
                let v = builder.build_load(ty, src, "cow.copy").expect("load");
                if let Some(load) = v.as_instruction_value() {
                    load.set_alignment(align(1)).expect("align");
                }
                let store = builder.build_store(dst, v).expect("store");
                store.set_alignment(align(0)).expect("align");
                inst.erase_from_basic_block();
            }
        }
    }
}

/// Whether `p` points into the function's own frame: an `alloca`, through casts and GEPs.
fn in_own_frame(mut p: PointerValue) -> bool {
    for _ in 0..32 {
        let Some(inst) = p.as_instruction() else {
            return false;
        };
        match inst.get_opcode() {
            InstructionOpcode::Alloca => return true,
            InstructionOpcode::GetElementPtr
            | InstructionOpcode::BitCast
            | InstructionOpcode::AddrSpaceCast => match pointer(inst.get_operand(0)) {
                Some(base) => p = base,
                None => return false,
            },
            _ => return false,
        }
    }
    false
}

fn enum_attribute(ctx: &ContextRef, name: &str) -> Attribute {
    ctx.create_enum_attribute(Attribute::get_named_enum_kind_id(name), 0)
}

fn external_global<'ctx>(
    module: &Module<'ctx>,
    ty: impl llvm_plugin::inkwell::types::BasicType<'ctx>,
    name: &str,
) -> GlobalValue<'ctx> {
    module
        .get_global(name)
        .unwrap_or_else(|| module.add_global(ty, None, name))
}

/// Defines `__cow_lmc_check_inline(ptr, i64)` in the module (see the crate documentation).
fn define_check<'ctx>(module: &Module<'ctx>, ctx: &ContextRef<'ctx>) -> FunctionValue<'ctx> {
    let (ptr, i64t, i16t) = (
        ctx.ptr_type(AddressSpace::default()),
        ctx.i64_type(),
        ctx.i16_type(),
    );
    let void = ctx.void_type();
    let args = [ptr.into(), i64t.into()];
    let slow = module
        .get_function(SLOW_PATH)
        .unwrap_or_else(|| module.add_function(SLOW_PATH, void.fn_type(&args, false), None));
    slow.set_call_conventions(PRESERVE_MOST);
    slow.add_attribute(AttributeLoc::Function, enum_attribute(ctx, "nounwind"));
    let gen = external_global(module, i16t, "__cow_lmc_gen");
    let shadow = external_global(module, ptr, "__cow_lmc_shadow");

    let check = module.add_function(
        CHECK,
        void.fn_type(&args, false),
        Some(Linkage::LinkOnceODR),
    );
    check
        .as_global_value()
        .set_visibility(GlobalVisibility::Hidden);
    for a in ["alwaysinline", "nounwind"] {
        check.add_attribute(AttributeLoc::Function, enum_attribute(ctx, a));
    }
    let p = check.get_nth_param(0).expect("p").into_pointer_value();
    let n = check.get_nth_param(1).expect("n").into_int_value();
    let entry = ctx.append_basic_block(check, "entry");
    let test = ctx.append_basic_block(check, "test");
    let tag = ctx.append_basic_block(check, "tag");
    let save = ctx.append_basic_block(check, "save");
    let done = ctx.append_basic_block(check, "done");
    let b: Builder = ctx.create_builder();
    let atomic_load = |b: &Builder<'ctx>, ty, at: PointerValue<'ctx>, name| {
        let v = b.build_load(ty, at, name).expect("load");
        let i = v.as_instruction_value().expect("load instruction");
        i.set_atomic_ordering(AtomicOrdering::Monotonic)
            .expect("atomic");
        i.set_alignment(2).expect("align");
        v.into_int_value()
    };
    let shift = i64t.const_int(REGION_SHIFT, false);

    // No snapshot held (generation 0): nothing to save.
    b.position_at_end(entry);
    let g = atomic_load(&b, i16t, gen.as_pointer_value(), "gen");
    let off = b
        .build_int_compare(IntPredicate::EQ, g, i16t.const_zero(), "off")
        .expect("cmp");
    b.build_conditional_branch(off, done, test).expect("br");

    // One region: its tag decides; two (or a zero length): the slow path.
    b.position_at_end(test);
    let a = b.build_ptr_to_int(p, i64t, "a").expect("ptrtoint");
    let r0 = b.build_right_shift(a, shift, false, "r0").expect("lshr");
    let end = b.build_int_add(a, n, "end").expect("add");
    let last = b
        .build_int_sub(end, i64t.const_int(1, false), "last")
        .expect("sub");
    let r1 = b.build_right_shift(last, shift, false, "r1").expect("lshr");
    let one = b
        .build_int_compare(IntPredicate::EQ, r0, r1, "one")
        .expect("cmp");
    b.build_conditional_branch(one, tag, save).expect("br");

    b.position_at_end(tag);
    let base = b
        .build_load(ptr, shadow.as_pointer_value(), "shadow")
        .expect("load")
        .into_pointer_value();
    // SAFETY: an in-bounds index into the shadow, which covers every user address.
    let at = unsafe { b.build_in_bounds_gep(i16t, base, &[r0], "tagp") }.expect("gep");
    let t = atomic_load(&b, i16t, at, "tag");
    let hit = b
        .build_int_compare(IntPredicate::EQ, t, g, "hit")
        .expect("cmp");
    b.build_conditional_branch(hit, done, save).expect("br");

    b.position_at_end(save);
    b.build_call(slow, &[p.into(), n.into()], "")
        .expect("call")
        .set_call_convention(PRESERVE_MOST);
    b.build_unconditional_branch(done).expect("br");

    b.position_at_end(done);
    b.build_return(None).expect("ret");
    check
}

/// The safe point the pass defines in each module: if a checkpoint is pending, take it.
const POLL: &str = "__cow_lmc_poll_inline";
/// The page a safe point reads (see [`insert_safe_points`]).
const POLL_PAGE: &str = "__cow_lmc_poll_page";

/// Puts a safe point (an inlined read of the object's poll page) at the entry of every function
/// a cycle of calls may pass through ([`entries_to_poll`]) and before every branch back to an
/// earlier block (a loop's back-edge, in clang's block order at the start of the pipeline).
/// None lies between a write's check and the write.
fn insert_safe_points<'ctx>(module: &Module<'ctx>, ctx: &ContextRef<'ctx>) {
    let void = ctx.void_type();
    let i8t = ctx.i8_type();
    // One page per linked object ([`register_module`] defines it, hidden: no GOT load), which
    // libcow makes inaccessible to ask for a checkpoint: the poll is a load, and the fault
    // takes the checkpoint. A compare and a conditional call instead cost the hot loops of
    // the program (Lua's pattern matcher: 0.27× of its run time) far more than a load.
    let page = external_global(module, i8t, POLL_PAGE);
    page.set_visibility(GlobalVisibility::Hidden);
    let poll = module.add_function(POLL, void.fn_type(&[], false), Some(Linkage::LinkOnceODR));
    poll.as_global_value()
        .set_visibility(GlobalVisibility::Hidden);
    for a in ["alwaysinline", "nounwind"] {
        poll.add_attribute(AttributeLoc::Function, enum_attribute(ctx, a));
    }
    let b = ctx.create_builder();
    b.position_at_end(ctx.append_basic_block(poll, "entry"));
    // Compiler barriers (signal fences, no instruction): no write or its check moves across
    // the poll, so a checkpoint taken there never falls between them.
    b.build_fence(AtomicOrdering::SequentiallyConsistent, 1, "")
        .expect("fence");
    let v = b
        .build_load(i8t, page.as_pointer_value(), "poll")
        .expect("load");
    v.as_instruction_value()
        .expect("load instruction")
        .set_volatile(true)
        .expect("volatile");
    b.build_fence(AtomicOrdering::SequentiallyConsistent, 1, "")
        .expect("fence");
    b.build_return(None).expect("ret");

    let entry_polled = entries_to_poll(module);
    for f in module.get_functions() {
        let name = f.get_name().to_bytes();
        if f.count_basic_blocks() == 0 || name == POLL.as_bytes() || name == CHECK.as_bytes() {
            continue;
        }
        let blocks = f.get_basic_blocks();
        let mut at = Vec::new();
        if entry_polled.contains(&f) {
            // Function entry: after the allocas.
            let mut first = blocks[0].get_first_instruction();
            while let Some(i) = first.filter(|i| i.get_opcode() == InstructionOpcode::Alloca) {
                first = i.get_next_instruction();
            }
            at.extend(first);
        }
        for (index, bb) in blocks.iter().enumerate() {
            let Some(term) = bb.get_terminator() else {
                continue;
            };
            let back = (0..term.get_num_operands()).any(|k| match term.get_operand(k) {
                Some(either::Either::Right(target)) => blocks
                    .iter()
                    .position(|b| *b == target)
                    .is_some_and(|t| t <= index),
                _ => false,
            });
            if back {
                at.push(term);
            }
        }
        for i in at {
            b.position_before(&i);
            b.build_call(poll, &[], "").expect("call");
        }
    }
}

/// The functions whose entry needs a safe point. A thread must reach one in bounded time, and
/// it can run unboundedly only around a cycle: a loop (every back-edge has a safe point) or a
/// cycle of calls. A cycle of calls either stays among the module's internal functions, called
/// directly — a recursive strongly connected component of the direct call graph — or passes
/// through a function another module or a pointer can call (external linkage, or its address
/// taken). Those get one; a static helper called directly and not recursively (`singlematch`
/// in Lua's pattern matcher, called per character) does not.
fn entries_to_poll<'ctx>(module: &Module<'ctx>) -> HashSet<FunctionValue<'ctx>> {
    let functions: Vec<FunctionValue> = module
        .get_functions()
        .filter(|f| f.count_basic_blocks() > 0)
        .collect();
    let positions: HashMap<FunctionValue, usize> =
        functions.iter().enumerate().map(|(k, f)| (*f, k)).collect();
    let index = |f: FunctionValue<'ctx>| positions.get(&f).copied();
    // The direct callees (within the module) of each function with a body.
    let callees: Vec<Vec<usize>> = functions
        .iter()
        .map(|f| {
            let mut out = Vec::new();
            for bb in f.get_basic_blocks() {
                let mut next = bb.get_first_instruction();
                while let Some(inst) = next {
                    next = inst.get_next_instruction();
                    if let Some(k) = direct_callee(module, inst).and_then(index) {
                        out.push(k);
                    }
                }
            }
            out
        })
        .collect();
    let cyclic = recursive(&callees);
    functions
        .iter()
        .enumerate()
        .filter(|&(k, f)| {
            let internal = matches!(f.get_linkage(), Linkage::Internal | Linkage::Private);
            !internal || address_taken(module, *f) || cyclic[k]
        })
        .map(|(_, f)| *f)
        .collect()
}

/// What a call or invoke instruction calls (its last operand), if it is one.
fn called(inst: InstructionValue) -> Option<PointerValue> {
    if !matches!(
        inst.get_opcode(),
        InstructionOpcode::Call | InstructionOpcode::Invoke
    ) {
        return None;
    }
    pointer(inst.get_operand(inst.get_num_operands().checked_sub(1)?))
}

/// The function of `module` a call or invoke instruction calls directly, if any.
fn direct_callee<'ctx>(
    module: &Module<'ctx>,
    inst: InstructionValue<'ctx>,
) -> Option<FunctionValue<'ctx>> {
    let callee = called(inst)?;
    let f = module.get_function(callee.get_name().to_str().ok()?)?;
    (f.as_global_value().as_pointer_value() == callee).then_some(f)
}

/// Whether `f` is used other than as the callee of a direct call.
fn address_taken<'ctx>(module: &Module<'ctx>, f: FunctionValue<'ctx>) -> bool {
    use llvm_plugin::inkwell::llvm_sys::core::{
        LLVMGetFirstUse, LLVMGetNextUse, LLVMGetUser, LLVMIsAInstruction,
    };
    let me = f.as_global_value().as_pointer_value();
    // SAFETY: walking the use list of a function of `module`, which outlives this call and is
    // not modified meanwhile; every user is a live value of the same context.
    unsafe {
        let mut next = LLVMGetFirstUse(me.as_value_ref());
        while !next.is_null() {
            let user = LLVMGetUser(next);
            next = LLVMGetNextUse(next);
            if LLVMIsAInstruction(user).is_null() {
                return true; // a constant: a table of function pointers, an initialiser
            }
            let inst = InstructionValue::new(user);
            let n = inst.get_num_operands();
            let callee_only = direct_callee(module, inst) == Some(f)
                && (0..n - 1).all(|k| pointer(inst.get_operand(k)) != Some(me));
            if !callee_only {
                return true;
            }
        }
    }
    false
}

/// For each node of a directed graph (adjacency lists), whether it lies on a cycle: in a
/// strongly connected component of more than one node, or calling itself (Tarjan's algorithm,
/// iterative).
fn recursive(edges: &[Vec<usize>]) -> Vec<bool> {
    let n = edges.len();
    let (mut order, mut low) = (vec![usize::MAX; n], vec![0; n]);
    let (mut on_stack, mut stack, mut cyclic) = (vec![false; n], Vec::new(), vec![false; n]);
    let mut counter = 0;
    for root in 0..n {
        if order[root] != usize::MAX {
            continue;
        }
        // (node, next edge to look at)
        let mut work = vec![(root, 0)];
        order[root] = counter;
        low[root] = counter;
        counter += 1;
        stack.push(root);
        on_stack[root] = true;
        while let Some(&mut (v, ref mut e)) = work.last_mut() {
            if let Some(&w) = edges[v].get(*e) {
                *e += 1;
                if w == v {
                    cyclic[v] = true;
                }
                if order[w] == usize::MAX {
                    order[w] = counter;
                    low[w] = counter;
                    counter += 1;
                    stack.push(w);
                    on_stack[w] = true;
                    work.push((w, 0));
                } else if on_stack[w] {
                    low[v] = low[v].min(order[w]);
                }
                continue;
            }
            work.pop();
            if let Some(&(parent, _)) = work.last() {
                low[parent] = low[parent].min(low[v]);
            }
            if low[v] == order[v] {
                let mut members = Vec::new();
                while let Some(w) = stack.pop() {
                    on_stack[w] = false;
                    members.push(w);
                    if w == v {
                        break;
                    }
                }
                if members.len() > 1 {
                    for w in members {
                        cyclic[w] = true;
                    }
                }
            }
        }
    }
    cyclic
}

/// What each instrumented object brings along, in its module assembly, each piece in a COMDAT
/// group of its own so that a linked executable or library holds one of each (hidden: its code
/// reaches them without the GOT or a PLT entry):
/// - the **poll page** its safe points read ([`insert_safe_points`]): alone in its page, as
///   libcow makes it inaccessible to request a checkpoint;
/// - `__cow_lmc_register_here`, called from an `.init_array` entry of every object: it
///   registers the poll page with libcow (`__cow_lmc_register`, which also tells
///   `cow_init("lmc")` that the program is instrumented);
/// - the slow paths' **preserve_most trampolines** ([`PRESERVE_MOST`]): they save what the C
///   ABI lets libcow's function clobber (every general-purpose register but r11; vector
///   registers stay the caller's to save) and call it, so that the inlined fast path costs the
///   code around it no caller-saved registers.
fn register_module(module: &Module) {
    let mut asm = String::new();
    let comdat = |asm: &mut String, kind: &str, section: &str, name: &str| {
        asm.push_str(&format!(
            "\t.pushsection {section}.{name},\"{kind}G\",@{},{name},comdat\n\t.weak {name}\n\t.hidden {name}\n",
            if kind == "aw" { "nobits" } else { "progbits" }
        ));
    };
    comdat(&mut asm, "aw", ".bss", POLL_PAGE);
    asm.push_str(&format!(
        "\t.p2align 12\n\t.type {POLL_PAGE},@object\n{POLL_PAGE}:\n\t.zero 4096\n\t.size {POLL_PAGE},4096\n\t.popsection\n"
    ));
    comdat(&mut asm, "ax", ".text", "__cow_lmc_register_here");
    asm.push_str(&format!(
        "\t.type __cow_lmc_register_here,@function\n__cow_lmc_register_here:\n\tlea {POLL_PAGE}(%rip),%rdi\n\tjmp __cow_lmc_register@PLT\n\t.size __cow_lmc_register_here,.-__cow_lmc_register_here\n\t.popsection\n"
    ));
    asm.push_str("\t.pushsection .init_array,\"aw\",@init_array\n\t.p2align 3\n\t.quad __cow_lmc_register_here\n\t.popsection\n");
    for (trampoline, target) in [
        (SLOW_PATH, "__cow_lmc_write"),
        (CHECK_OUT_OF_LINE, "__cow_lmc_check"),
    ] {
        comdat(&mut asm, "ax", ".text", trampoline);
        asm.push_str(&format!(
            "\t.type {trampoline},@function\n\t.p2align 4\n{trampoline}:\n\t.cfi_startproc\n"
        ));
        const SAVED: [&str; 8] = ["rax", "rcx", "rdx", "rsi", "rdi", "r8", "r9", "r10"];
        for r in SAVED {
            asm.push_str(&format!("\tpush %{r}\n\t.cfi_adjust_cfa_offset 8\n"));
        }
        // Eight pushes leave the stack 8 bytes off the 16 the call needs.
        asm.push_str(&format!(
            "\tsub $8,%rsp\n\t.cfi_adjust_cfa_offset 8\n\tcall {target}@PLT\n\tadd $8,%rsp\n\t.cfi_adjust_cfa_offset -8\n"
        ));
        for r in SAVED.iter().rev() {
            asm.push_str(&format!("\tpop %{r}\n\t.cfi_adjust_cfa_offset -8\n"));
        }
        asm.push_str(&format!(
            "\tret\n\t.cfi_endproc\n\t.size {trampoline},.-{trampoline}\n\t.popsection\n"
        ));
    }
    // SAFETY: appending text to the module's inline assembly.
    unsafe {
        llvm_plugin::inkwell::llvm_sys::core::LLVMAppendModuleInlineAsm(
            module.as_mut_ptr(),
            asm.as_ptr().cast(),
            asm.len(),
        )
    };
}
