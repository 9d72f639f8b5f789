/**
 * What every opened image is to its users (the v86 adapter, the CLI, convert): a guest-visible disk of
 * `virtualSize` bytes. qcow2, legacy qcow and raw images all implement it.
 */
export interface BlockDevice {
  /** The image's store name (path or URL), for messages. */
  readonly name: string;
  readonly format: 'qcow2' | 'qcow' | 'raw';
  readonly virtualSize: number;
  readonly readOnly: boolean;
  /** Guest-visible bytes; ranges past virtualSize are an error. */
  read(offset: number, length: number): Promise<Uint8Array>;
  /**
   * Optional: fills all of `into` with guest bytes [offset, offset+into.length), overwriting whatever it held.
   * Lets convert reuse its buffers instead of allocating one per request.
   */
  readInto?(offset: number, into: Uint8Array): Promise<void>;
  /** Guest write; copy-on-write for images with a backing file. */
  write(offset: number, data: Uint8Array): Promise<void>;
  /**
   * Optional: makes [offset, offset+length) read as zeros without sending zero bytes (qcow2: zero flags);
   * `unmap` lets the image give the host clusters back. Devices without it get zero bytes written instead.
   */
  writeZeroes?(offset: number, length: number, options?: { unmap?: boolean }): Promise<void>;
  /**
   * Optional: the guest no longer needs [offset, offset+length). Whole clusters are given back and read as
   * zeros afterwards (also over a backing file); parts of a cluster may keep their contents. Devices without
   * it ignore discards (a discard is advisory).
   */
  discard?(offset: number, length: number): Promise<void>;
  /** Makes all completed writes (data and metadata) durable, in a crash-safe order. */
  flush(): Promise<void>;
  /** Flushes and releases the image and its whole backing chain. */
  close(): Promise<void>;
}
