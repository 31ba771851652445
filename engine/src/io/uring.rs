pub struct UringIo;
