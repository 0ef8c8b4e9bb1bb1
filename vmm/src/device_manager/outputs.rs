//! Where the serial port and the virtio console write: opened once per
//! `trellis` process, not once per VM, so that a VM rebuilt after a guest
//! reset continues the same files instead of truncating (console) or
//! reopening (serial) them.

use std::fs::File;
use std::io::{self, Write};
use std::path::Path;
use std::sync::Mutex;

use crate::config::OutputMode;

/// One output (`off`, `tty` or `file=PATH`). A file is opened on first use
/// (so nothing is created before the VM gets that far) and every VM after
/// that writes through a duplicate of the same descriptor, which shares
/// the file offset: output lands after what earlier boots wrote.
#[derive(Debug)]
pub struct Output {
    mode: OutputMode,
    /// Open for appending (the serial port) or created afresh (the console).
    append: bool,
    file: Mutex<Option<File>>,
}

impl Output {
    /// An output that appends to an existing file.
    pub fn appending(mode: OutputMode) -> Self {
        Self::new(mode, true)
    }

    /// An output whose file is truncated when it is first opened.
    pub fn truncating(mode: OutputMode) -> Self {
        Self::new(mode, false)
    }

    fn new(mode: OutputMode, append: bool) -> Self {
        Output {
            mode,
            append,
            file: Mutex::new(None),
        }
    }

    /// What the configuration asked for.
    pub fn mode(&self) -> &OutputMode {
        &self.mode
    }

    /// A handle on the file of `file=PATH` (opened on the first call),
    /// `None` for `off` and `tty`.
    pub fn file(&self) -> io::Result<Option<File>> {
        let OutputMode::File(path) = &self.mode else {
            return Ok(None);
        };
        let mut file = self.file.lock().unwrap_or_else(|e| e.into_inner());
        if file.is_none() {
            *file = Some(open(path, self.append)?);
        }
        file.as_ref().map(File::try_clone).transpose()
    }

    /// Where to write: stdout, the file, or nowhere (`off`).
    pub fn writer(&self) -> io::Result<Option<Box<dyn Write + Send>>> {
        Ok(match &self.mode {
            OutputMode::Off => None,
            OutputMode::Tty => Some(Box::new(io::stdout())),
            OutputMode::File(_) => self.file()?.map(|f| Box::new(f) as Box<dyn Write + Send>),
        })
    }
}

/// Opens `path`; the error names it.
fn open(path: &Path, append: bool) -> io::Result<File> {
    let mut options = File::options();
    options.create(true);
    if append {
        options.append(true);
    } else {
        options.write(true).truncate(true);
    }
    options
        .open(path)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))
}

/// The outputs of the serial port and of the virtio console.
#[derive(Debug)]
pub struct Outputs {
    /// COM1: a file is appended to.
    pub serial: Output,
    /// The virtio console: a file is created or truncated.
    pub console: Output,
}

impl Outputs {
    /// The outputs `serial` and `console` describe, opened on first use.
    pub fn new(serial: &OutputMode, console: &OutputMode) -> Self {
        Outputs {
            serial: Output::appending(serial.clone()),
            console: Output::truncating(console.clone()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str) -> std::path::PathBuf {
        std::env::temp_dir().join(format!("trellis-outputs-{name}-{}", std::process::id()))
    }

    fn write(output: &Output, text: &str) {
        let mut w = output.writer().unwrap().unwrap();
        w.write_all(text.as_bytes()).unwrap();
        w.flush().unwrap();
    }

    #[test]
    fn later_vms_continue_the_same_files() {
        for (name, append) in [("serial", true), ("console", false)] {
            let path = temp(name);
            std::fs::write(&path, "before trellis\n").unwrap();
            let output = Output::new(OutputMode::File(path.clone()), append);
            // One writer per VM, as each rebuilt VM gets its own.
            write(&output, "boot 1\n");
            write(&output, "boot 2\n");
            let expected = match append {
                true => "before trellis\nboot 1\nboot 2\n",
                false => "boot 1\nboot 2\n",
            };
            assert_eq!(std::fs::read_to_string(&path).unwrap(), expected, "{name}");
            std::fs::remove_file(&path).unwrap();
        }
    }

    #[test]
    fn nothing_is_created_before_first_use() {
        let path = temp("lazy");
        let _ = std::fs::remove_file(&path);
        let outputs = Outputs::new(&OutputMode::Off, &OutputMode::File(path.clone()));
        assert!(!path.exists());
        assert!(outputs.serial.writer().unwrap().is_none());
        assert!(outputs.console.file().unwrap().is_some());
        assert!(path.exists());
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn a_file_that_cannot_be_opened_is_an_error_each_time() {
        let output = Output::appending(OutputMode::File("/nonexistent/dir/out".into()));
        assert!(output.writer().is_err());
        let err = output.file().unwrap_err().to_string();
        assert!(err.starts_with("/nonexistent/dir/out: "), "{err}");
    }
}
