;; `p1-hello`: a WASI preview 1 command module, for the legacy path. Prints a greeting and
;; the value of its first argument count, then exits 0. Converted to binary wasm at build time.
(module
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))
  (memory (export "memory") 1)
  ;; iovec at 0: { buf = 16, len = 26 }
  (data (i32.const 0) "\10\00\00\00\1a\00\00\00")
  (data (i32.const 16) "hello from wasi preview 1\n")
  (func (export "_start")
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))
    (call $proc_exit (i32.const 0))))
