//! The LLVM pass behind `cowcc` (LMC: compiler-instrumented checkpoints).
//!
//! Before every store, atomic read-modify-write, cmpxchg and `llvm.memcpy`/`llvm.memmove`/
//! `llvm.memset` whose destination is not provably in the function's own stack frame (an
//! `alloca`, through casts and GEPs), it inserts a call to `__cow_lmc_check_inline(dst, len)`,
//! a function the pass defines in the module as `alwaysinline`: it compares the region's
//! shadow tag with the current generation (loads and a compare, inlined) and calls libcow's
//! `__cow_lmc_write` only on the first write of a 128-byte region in a generation, or when the
//! write spans two regions. This runs at the start of the pipeline, so the inliner (or the
//! always-inliner at `-O0`) folds the check into the code and the optimizer sees it. Every
//! instrumented write carries `!cow.lmc` metadata; at the end of the pipeline the pass runs
//! again and instruments what has none — writes the optimizer created (library-call
//! simplification turns a `strcpy` of a known string into stores) — with a call to libcow's
//! out-of-line `__cow_lmc_check`.
//!
//! Each instrumented module also adds an `.init_array` entry calling `__cow_lmc_register`, so
//! that `cow_init("lmc")` can tell an instrumented program from one that is not.

use llvm_plugin::inkwell::attributes::{Attribute, AttributeLoc};
use llvm_plugin::inkwell::basic_block::BasicBlock;
use llvm_plugin::inkwell::builder::Builder;
use llvm_plugin::inkwell::context::ContextRef;
use llvm_plugin::inkwell::module::{Linkage, Module};
use llvm_plugin::inkwell::targets::TargetData;
use llvm_plugin::inkwell::values::{
    BasicValue, BasicValueEnum, FunctionValue, GlobalValue, InstructionOpcode, InstructionValue,
    IntValue, PointerValue,
};
use llvm_plugin::inkwell::{AddressSpace, AtomicOrdering, GlobalVisibility, IntPredicate};
use llvm_plugin::{
    LlvmModulePass, ModuleAnalysisManager, PassBuilder, PipelineParsing, PreservedAnalyses,
};

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
const CHECK_OUT_OF_LINE: &str = "__cow_lmc_check";

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
                module.add_function(CHECK_OUT_OF_LINE, void.fn_type(&args, false), None)
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
            builder
                .build_call(check, &[s.dst.into(), len.into()], "")
                .expect("call");
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
            let callee = pointer(inst.get_operand(inst.get_num_operands().checked_sub(1)?))?;
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
    let slow = module.get_function("__cow_lmc_write").unwrap_or_else(|| {
        module.add_function("__cow_lmc_write", void.fn_type(&args, false), None)
    });
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
    b.build_call(slow, &[p.into(), n.into()], "").expect("call");
    b.build_unconditional_branch(done).expect("br");

    b.position_at_end(done);
    b.build_return(None).expect("ret");
    check
}

/// The safe point the pass defines in each module: if a checkpoint is pending, take it.
const POLL: &str = "__cow_lmc_poll_inline";

/// Puts a safe point (an inlined poll of `__cow_lmc_pending`) at every function's entry and
/// before every branch back to an earlier block (a loop's back-edge, in clang's block order at
/// the start of the pipeline). None lies between a write's check and the write.
fn insert_safe_points<'ctx>(module: &Module<'ctx>, ctx: &ContextRef<'ctx>) {
    let void = ctx.void_type();
    let i8t = ctx.i8_type();
    let safepoint = module
        .get_function("__cow_lmc_safepoint")
        .unwrap_or_else(|| {
            module.add_function("__cow_lmc_safepoint", void.fn_type(&[], false), None)
        });
    let pending = external_global(module, i8t, "__cow_lmc_pending");
    let poll = module.add_function(POLL, void.fn_type(&[], false), Some(Linkage::LinkOnceODR));
    poll.as_global_value()
        .set_visibility(GlobalVisibility::Hidden);
    for a in ["alwaysinline", "nounwind"] {
        poll.add_attribute(AttributeLoc::Function, enum_attribute(ctx, a));
    }
    let entry = ctx.append_basic_block(poll, "entry");
    let take = ctx.append_basic_block(poll, "take");
    let done = ctx.append_basic_block(poll, "done");
    let b = ctx.create_builder();
    b.position_at_end(entry);
    let v = b
        .build_load(i8t, pending.as_pointer_value(), "pending")
        .expect("load");
    if let Some(i) = v.as_instruction_value() {
        i.set_atomic_ordering(AtomicOrdering::Monotonic)
            .expect("atomic");
    }
    let set = b
        .build_int_compare(
            IntPredicate::NE,
            v.into_int_value(),
            i8t.const_zero(),
            "set",
        )
        .expect("cmp");
    b.build_conditional_branch(set, take, done).expect("br");
    b.position_at_end(take);
    b.build_call(safepoint, &[], "").expect("call");
    b.build_unconditional_branch(done).expect("br");
    b.position_at_end(done);
    b.build_return(None).expect("ret");

    for f in module.get_functions() {
        let name = f.get_name().to_bytes();
        if f.count_basic_blocks() == 0 || name == POLL.as_bytes() || name == CHECK.as_bytes() {
            continue;
        }
        let blocks = f.get_basic_blocks();
        let mut at = Vec::new();
        // Function entry: after the allocas.
        let mut first = blocks[0].get_first_instruction();
        while let Some(i) = first.filter(|i| i.get_opcode() == InstructionOpcode::Alloca) {
            first = i.get_next_instruction();
        }
        at.extend(first);
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

/// Adds an `.init_array` entry calling `__cow_lmc_register` when the object is loaded.
fn register_module(module: &Module) {
    let ctx = module.get_context();
    let void = ctx.void_type();
    if module.get_function("__cow_lmc_register").is_none() {
        module.add_function("__cow_lmc_register", void.fn_type(&[], false), None);
    }
    let asm = "\t.pushsection .init_array,\"aw\",@init_array\n\t.p2align 3\n\t.quad __cow_lmc_register\n\t.popsection\n";
    // SAFETY: appending text to the module's inline assembly.
    unsafe {
        llvm_plugin::inkwell::llvm_sys::core::LLVMAppendModuleInlineAsm(
            module.as_mut_ptr(),
            asm.as_ptr().cast(),
            asm.len(),
        )
    };
}
