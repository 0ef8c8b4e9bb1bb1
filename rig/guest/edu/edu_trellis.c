// SPDX-License-Identifier: GPL-2.0
/*
 * edu_trellis: a minimal driver for QEMU's "edu" teaching device
 * (1234:11e8, QEMU docs/specs/edu.rst), for the rig's VFIO checks in L2.
 *
 * It takes one interrupt vector (MSI by default, INTx with use_msi=0),
 * acknowledges every interrupt the device raises and counts them. The rig
 * drives it through module parameters:
 *
 *   /sys/module/edu_trellis/parameters/raise      write N: raise interrupt
 *                                                 status N (register 0x60)
 *   /sys/module/edu_trellis/parameters/factorial  write N: compute N! with
 *                                                 "interrupt when done" set
 *   .../irq_count      interrupts handled so far
 *   .../last_status    the status the last interrupt carried (0x24)
 *   .../result         the factorial register after the last interrupt
 *   .../mode           "msi" or "intx", what the vector is
 */
#include <linux/interrupt.h>
#include <linux/module.h>
#include <linux/pci.h>

#define EDU_ID 0x00
#define EDU_FACTORIAL 0x08
#define EDU_STATUS 0x20
#define EDU_STATUS_IRQ_AFTER_FACTORIAL 0x80
#define EDU_IRQ_STATUS 0x24
#define EDU_IRQ_RAISE 0x60
#define EDU_IRQ_ACK 0x64

static bool use_msi = true;
module_param(use_msi, bool, 0444);
MODULE_PARM_DESC(use_msi, "use MSI (1) or INTx (0)");

static unsigned int irq_count;
module_param(irq_count, uint, 0444);
static unsigned int last_status;
module_param(last_status, uint, 0444);
static unsigned int result;
module_param(result, uint, 0444);
static char *mode = "none";
module_param(mode, charp, 0444);

/* The one device we drive (the rig gives L2 a single edu). */
static void __iomem *edu_bar;

static irqreturn_t edu_irq(int irq, void *data)
{
	u32 status = ioread32(edu_bar + EDU_IRQ_STATUS);

	/* INTx may be shared: not ours if nothing is pending. */
	if (!status)
		return IRQ_NONE;
	iowrite32(status, edu_bar + EDU_IRQ_ACK);
	WRITE_ONCE(last_status, status);
	WRITE_ONCE(result, ioread32(edu_bar + EDU_FACTORIAL));
	WRITE_ONCE(irq_count, READ_ONCE(irq_count) + 1);
	return IRQ_HANDLED;
}

static int raise_set(const char *val, const struct kernel_param *kp)
{
	u32 v;
	int ret = kstrtou32(val, 0, &v);

	if (ret)
		return ret;
	if (!edu_bar)
		return -ENODEV;
	iowrite32(v, edu_bar + EDU_IRQ_RAISE);
	return 0;
}

static int factorial_set(const char *val, const struct kernel_param *kp)
{
	u32 v;
	int ret = kstrtou32(val, 0, &v);

	if (ret)
		return ret;
	if (!edu_bar)
		return -ENODEV;
	iowrite32(EDU_STATUS_IRQ_AFTER_FACTORIAL, edu_bar + EDU_STATUS);
	iowrite32(v, edu_bar + EDU_FACTORIAL);
	return 0;
}

static const struct kernel_param_ops raise_ops = { .set = raise_set };
static const struct kernel_param_ops factorial_ops = { .set = factorial_set };
module_param_cb(raise, &raise_ops, NULL, 0200);
module_param_cb(factorial, &factorial_ops, NULL, 0200);

static int edu_probe(struct pci_dev *pdev, const struct pci_device_id *id)
{
	int ret, nvec;

	ret = pcim_enable_device(pdev);
	if (ret)
		return ret;
	ret = pcim_iomap_regions(pdev, BIT(0), "edu_trellis");
	if (ret)
		return ret;
	edu_bar = pcim_iomap_table(pdev)[0];
	dev_info(&pdev->dev, "edu id %#x\n", ioread32(edu_bar + EDU_ID));
	/* An MSI is a memory write by the device: it needs bus mastering. */
	pci_set_master(pdev);

	nvec = pci_alloc_irq_vectors(pdev, 1, 1,
				     use_msi ? PCI_IRQ_MSI : PCI_IRQ_LEGACY);
	if (nvec < 0)
		return nvec;
	ret = request_irq(pci_irq_vector(pdev, 0), edu_irq,
			  use_msi ? 0 : IRQF_SHARED, "edu-trellis", pdev);
	if (ret) {
		pci_free_irq_vectors(pdev);
		return ret;
	}
	mode = pdev->msi_enabled ? "msi" : "intx";
	return 0;
}

static void edu_remove(struct pci_dev *pdev)
{
	free_irq(pci_irq_vector(pdev, 0), pdev);
	pci_free_irq_vectors(pdev);
	edu_bar = NULL;
}

static const struct pci_device_id edu_ids[] = {
	{ PCI_DEVICE(0x1234, 0x11e8) },
	{ 0 }
};
MODULE_DEVICE_TABLE(pci, edu_ids);

static struct pci_driver edu_driver = {
	.name = "edu_trellis",
	.id_table = edu_ids,
	.probe = edu_probe,
	.remove = edu_remove,
};
module_pci_driver(edu_driver);

MODULE_DESCRIPTION("QEMU edu device interrupt counter for the trellis rig");
MODULE_LICENSE("GPL");
