// SPDX-License-Identifier: GPL-2.0
//! cow.ko — copy-on-write memory snapshots as a kernel primitive.
//!
//! Registers the misc device `/dev/cow`. Each open file is one *space* (the covered memory of one
//! process). The ioctl ABI is defined once, in `abi/src/cow_abi.rs`, and shared with libcow.

use kernel::{
    fs::File,
    miscdevice::{MiscDevice, MiscDeviceOptions, MiscDeviceRegistration},
    prelude::*,
};

// The ABI is shared verbatim with userland, so its items are `pub` and some (the encoders of
// command numbers) are only used on the userland side.
#[allow(unreachable_pub, dead_code)]
#[path = "../abi/src/cow_abi.rs"]
mod abi;
mod uarg;

module! {
    type: CowModule,
    name: "cow",
    authors: ["Delorean developers"],
    description: "Copy-on-write memory snapshots (/dev/cow)",
    license: "GPL",
}

#[pin_data]
struct CowModule {
    #[pin]
    _miscdev: MiscDeviceRegistration<Space>,
}

impl kernel::InPlaceModule for CowModule {
    fn init(_module: &'static ThisModule) -> impl PinInit<Self, Error> {
        pr_info!("/dev/cow ready, ABI version {}\n", abi::COW_ABI_VERSION);
        try_pin_init!(Self {
            _miscdev <- MiscDeviceRegistration::register(MiscDeviceOptions { name: c"cow" }),
        })
    }
}

/// The state behind one open `/dev/cow`: the covered memory of one process.
struct Space;

#[vtable]
impl MiscDevice for Space {
    type Ptr = KBox<Self>;

    fn open(_file: &File, _misc: &MiscDeviceRegistration<Self>) -> Result<KBox<Self>> {
        Ok(KBox::new(Space, GFP_KERNEL)?)
    }

    fn ioctl(_space: &Space, _file: &File, cmd: u32, arg: usize) -> Result<isize> {
        // Dispatch on type and number only: the size bits are informational (see cow_abi.rs).
        if abi::ioc_type(cmd) != abi::COW_IOC_MAGIC {
            return Err(ENOTTY);
        }
        match abi::ioc_nr(cmd) {
            abi::nr::VERSION => {
                let (mut version, out) = uarg::read::<abi::CowVersion>(arg, abi::COW_VERSION_SIZE_V1)?;
                version.abi_version = abi::COW_ABI_VERSION;
                version.page_size = kernel::page::PAGE_SIZE as u32;
                version.reserved = 0;
                version.features = 0;
                out.write(&version)?;
                Ok(0)
            }
            _ => Err(ENOTTY),
        }
    }
}
