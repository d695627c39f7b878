// The sender against the strict mock Panda over real HTTP, with a real sled outbox.
mod sender;
